"""Compile every NF4 kernel configuration for NVIDIA GPUs ahead of time, no GPU needed: errors, registers, spills.

    python kernels/compile_nf4.py                     # sm_80 and sm_90, every autotune config; prints a table
    python kernels/compile_nf4.py --arch 90 --out kernels/results/compile-sm90.json

The Triton interpreter (what the CPU tests run) executes kernels as numpy and accepts code the GPU compiler
rejects, and it says nothing about how a kernel uses the hardware. This compiles each kernel with Triton's own
CUDA backend (ptxas ships in the triton wheel) for the given architectures, for every configuration its
``@triton.autotune`` may pick on a GPU, in each dtype, and reads what the compiled binary reports: registers per
thread, bytes spilled to local memory, shared memory. A config that spills is one autotune should never pick; the
test suite runs this and fails on compile errors and on spills.

Integers are compiled without the specializations a real launch adds (a stride of 1 as a constant, divisibility
by 16 of sizes and strides): the binary a GPU runs may vectorize more and differ in registers and shared memory.
These figures catch compile errors and gross resource problems; they are not the launched binary's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ["TRITON_INTERPRET"] = "0"  # the GPU configs, not the interpreter's single one; set before dtune.kernels

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

DTYPES = {"bf16": (tl.bfloat16, "bf16"), "fp16": (tl.float16, "fp16"), "fp32": (tl.float32, "fp32")}
NF4_PTRS = {
    "packed_ptr": "*u8",
    "absmax_ptr": "*u8",
    "absmax2_ptr": "*fp32",
    "code2_ptr": "*fp32",
    "offset_ptr": "*fp32",
    "code_ptr": "*fp32",
}
LAYOUT = {"BLOCKSIZE": 64, "BLOCKSIZE2": 256, "DOUBLE_QUANT": True}
# Largest shared memory one block may use (opt-in): A100 163 KiB, H100/H200 227 KiB. A config over it compiles but
# cannot launch; autotune skips it there.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def cases() -> list[dict[str, Any]]:
    """(kernel, configs, pointer types, constexprs) for each kernel, pass and dtype the package launches."""
    from importlib import import_module

    # The modules, not the functions of the same names that dtune.kernels exports.
    nf4_dequantize, nf4_gemv, nf4_matmul, nf4_grouped = (
        import_module(f"dtune.kernels.{m}") for m in ("nf4_dequantize", "nf4_gemv", "nf4_matmul", "nf4_grouped")
    )

    out = []
    for dname, (tl_dtype, ptr) in DTYPES.items():
        for suffix, whole_blocks in (("", True), (" ragged", False)):
            out.append(
                {
                    "name": f"nf4_dequantize {dname}{suffix}",
                    "kernel": nf4_dequantize._nf4_dequantize_kernel,
                    "configs": [triton.Config(nf4_dequantize.LAUNCH, num_warps=nf4_dequantize.NUM_WARPS)],
                    "ptrs": {**NF4_PTRS, "out_ptr": f"*{ptr}"},
                    "const": {**LAYOUT, "WHOLE_BLOCKS": whole_blocks, "OUT_DTYPE": tl_dtype, "RNE_BF16": False},
                }
            )
        variants = [(0, True), (16, True), (64, True), (0, False)] if dname == "bf16" else [(0, True)]
        for grad_input in (False, True):
            for rank, aligned in variants:
                lora = f" +LoRA r{rank}" if rank else ""
                ragged = "" if aligned else " ragged K"
                out.append(
                    {
                        "name": f"nf4_matmul{'_grad_input' if grad_input else ''} {dname}{lora}{ragged}",
                        "kernel": nf4_matmul._nf4_matmul_kernel,
                        "ptrs": {
                            "in_ptr": f"*{ptr}",
                            **NF4_PTRS,
                            "bias_ptr": f"*{ptr}",
                            "lora_in_ptr": f"*{ptr}",
                            "lora_w_ptr": f"*{ptr}",
                            "out_ptr": f"*{ptr}",
                        },
                        "const": {
                            **LAYOUT,
                            "GRAD_INPUT": grad_input,
                            "HAS_BIAS": not grad_input,
                            "ALIGNED": aligned,
                            "R_PAD": rank,
                            "X_DTYPE": tl_dtype,
                            "DOT_FP32": False,
                            "RNE_BF16": False,
                        },
                    }
                )
        for grad_input in (False, True):  # MoE experts: the grouped kernel, each row-tile height it launches with
            for block_m in (16, 32, 64, 128) if dname == "bf16" else (64,):
                for aligned in (True, False) if dname == "bf16" and block_m == 64 else (True,):
                    out.append(
                        {
                            "name": f"nf4_grouped{'_grad_input' if grad_input else ''} {dname} BLOCK_M {block_m}"
                            + ("" if aligned else " ragged K"),
                            "kernel": nf4_grouped._nf4_grouped_kernel,
                            "ptrs": {
                                "in_ptr": f"*{ptr}",
                                **NF4_PTRS,
                                "offsets_ptr": "*i32",
                                "tile_expert_ptr": "*i32",
                                "tile_first_ptr": "*i32",
                                "out_ptr": f"*{ptr}",
                            },
                            "const": {
                                **LAYOUT,
                                "GRAD_INPUT": grad_input,
                                "ALIGNED": aligned,
                                "X_DTYPE": tl_dtype,
                                "DOT_FP32": False,
                                "RNE_BF16": False,
                                "BLOCK_M": block_m,
                            },
                        }
                    )
        for m_pad in nf4_gemv.M_BUCKETS:
            out.append(
                {
                    "name": f"nf4_gemv {dname} rows<={m_pad}",
                    "kernel": nf4_gemv._nf4_gemv_kernel,
                    "ptrs": {"x_ptr": f"*{ptr}", **NF4_PTRS, "partial_ptr": "*fp32"},
                    "const": {
                        **LAYOUT,
                        "ALIGNED": True,
                        "X_DTYPE": tl_dtype,
                        "RNE_BF16": False,
                        "DOT_FP32": False,
                        "M_PAD": m_pad,
                    },
                }
            )
    return out


def compile_one(kernel: Any, config: triton.Config, ptrs: dict[str, str], const: dict[str, Any], arch: int) -> dict[str, Any]:
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # under @triton.autotune, the JITFunction
    constexprs = {**const, **config.kwargs}
    signature = {}
    for param in fn.params:
        name = param.name
        signature[name] = "constexpr" if param.is_constexpr else ptrs.get(name, "i32")
        if param.is_constexpr and name not in constexprs:
            raise KeyError(f"{fn.__name__}: no value for constexpr {name}")
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": False}
    t0 = time.perf_counter()
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32), options=options
    )
    usage = resource_usage(compiled.asm["cubin"])
    return {
        "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
        "registers": usage["REG"],
        "spill_bytes": usage["LOCAL"],  # per-thread local memory: what ptxas spilled (the kernels use no local arrays)
        "shared_bytes": compiled.metadata.shared,
        "compile_s": round(time.perf_counter() - t0, 2),
    }


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the binary's kernel, from cuobjdump (shipped with triton)."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = Path(knobs.nvidia.ptxas.path).with_name("cuobjdump")
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {key: int(found.get(key, 0)) for key in ("REG", "STACK", "SHARED", "LOCAL")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", type=int, default=[80, 90], help="compute capabilities (80: A100, 90: H100)")
    parser.add_argument("--only", default="", help="compile only cases whose name contains this")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    parser.add_argument("--first", action="store_true", help="only the first autotune config of each kernel (quick check)")
    args = parser.parse_args(argv)
    rows, failures = [], []
    for case in cases():
        if args.only not in case["name"]:
            continue
        configs = case.get("configs") or case["kernel"].configs
        configs = configs[:1] if args.first else configs
        for arch in args.arch:
            for config in configs:
                try:
                    row = compile_one(case["kernel"], config, case["ptrs"], case["const"], arch)
                except Exception as err:  # report every failure, not the first
                    failures.append(f"{case['name']} sm_{arch} {config}: {type(err).__name__}: {str(err)[:2000]}")
                    continue
                row["launches"] = row["shared_bytes"] <= SMEM_LIMIT.get(arch, 99 * 1024)
                rows.append({"kernel": case["name"], "arch": f"sm_{arch}", **row})
                cfg = " ".join(f"{k}={v}" for k, v in row["config"].items())
                print(
                    f"{case['name']:<34} sm_{arch}  {cfg:<72} regs {row['registers']:>3}  spill {row['spill_bytes']:>5} B  "
                    f"smem {row['shared_bytes']:>6} B{'' if row['launches'] else '  (over the limit: cannot launch)'}",
                    flush=True,
                )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        versions = {"triton": triton.__version__}
        args.out.write_text(json.dumps({"versions": versions, "compiled": rows, "failures": failures}, indent=1) + "\n")
    for line in failures:
        print("FAILED", line, file=sys.stderr)
    spilling = [r for r in rows if r["spill_bytes"]]
    idle = sum(not r["launches"] for r in rows)
    print(f"\n{len(rows)} compiled, {len(failures)} failed, {len(spilling)} spill, {idle} over the shared-memory limit")
    return 1 if failures or spilling else 0


if __name__ == "__main__":
    sys.exit(main())
