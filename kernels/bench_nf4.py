"""Benchmark dtune's NF4 kernels against bitsandbytes and a bf16 matmul, side by side, in one run.

    python kernels/bench_nf4.py                          # all shapes, writes kernels/results/<gpu>.json
    python kernels/bench_nf4.py --models llama8b --tokens 1 4096
    TRITON_INTERPRET=1 python kernels/bench_nf4.py --smoke   # CPU, tiny shapes: checks the harness runs

For each linear shape of Llama 8B / 70B (plus the 4096x11008 MLP shape the targets name) and each token count:

* forward  -- ours: ``dtune::nf4_linear`` (split-K GEMV up to 16 tokens, fused tiled matmul above);
              bitsandbytes: ``bnb.matmul_4bit`` (gemv_4bit for one token, dequantize_4bit + matmul otherwise);
              bf16: ``torch.matmul`` on the already-dequantized weight (the floor a 4-bit method chases);
* grad_x   -- ours: fused ``nf4_matmul_grad_input``; bitsandbytes: dequantize_4bit then ``grad_y @ W`` (what its
              MatMul4Bit backward does); bf16: ``grad_y @ W``.

LoRA (``--lora-ranks``, token counts >= 512): one adapted layer, y = x W^T + s (x A^T) B^T, forward and a whole
training pass (forward + backward to x, A and B), three ways: ``fused`` -- ``dtune::nf4_lora_linear`` (the adapter
in the kernel's epilogue; what ``quant.fuse_lora=true`` runs); ``unfused`` -- ``dtune::nf4_linear`` then PEFT's
adapter path (clone, two small matmuls, scale, add); ``bnb`` -- ``bnb.matmul_4bit`` then the same adapter path (what
PEFT + bitsandbytes run). ``unfused/fused`` is what fusing the adapter buys.

Timing: CUDA events around each call, warm-up first, median of many repetitions, rotating over several copies
of the weights and inputs (more bytes than L2) so the cache does not flatter. Each case is checked against an
fp32 reference before it is timed. Also: ``nf4_dequantize`` vs ``dequantize_4bit`` effective bandwidth, against a
measured device-to-device copy. Prints a table with ratios; writes every figure with device and versions to JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MODELS = {
    # (in_features, out_features) of each distinct linear layer
    "llama8b": [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)],
    "llama2-7b-mlp": [(4096, 11008), (11008, 4096)],
    "llama70b": [(8192, 8192), (8192, 1024), (8192, 28672), (28672, 8192)],
}
TOKENS = [1, 16, 512, 4096, 16384]
ROTATE_BYTES = 256 * 2**20  # rotate over at least this many bytes of weights (H100 L2: 50 MB)


def versions() -> dict[str, str]:
    import bitsandbytes
    import triton

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "cuda": str(torch.version.cuda),
    }
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        out["sm_count"] = str(torch.cuda.get_device_properties(0).multi_processor_count)
    else:
        out["device"] = f"cpu ({platform.processor() or platform.machine()}), Triton interpreter"
    return out


class Timer:
    """Median milliseconds of fn(i) over reps, i rotating over the prepared copies."""

    def __init__(self, device: str, warmup: int, reps: int) -> None:
        self.cuda = device == "cuda"
        self.warmup, self.reps = warmup, reps

    def __call__(self, fn: Callable[[int], Any]) -> float:
        for i in range(self.warmup):
            fn(i)
        times = []
        if self.cuda:
            torch.cuda.synchronize()
            for i in range(self.reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(i)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for i in range(self.reps):
                t0 = time.perf_counter()
                fn(i)
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def rotation(k: int, n: int, device: str) -> int:
    """How many copies of a [n, k] bf16 weight (and its inputs) to rotate over: >= ROTATE_BYTES on a GPU, 2 to 8."""
    return max(2, min(8, math.ceil(ROTATE_BYTES / (n * k * 2)))) if device == "cuda" else 2


def make_weights(k: int, n: int, copies: int, device: str, gen: torch.Generator) -> list[dict[str, Any]]:
    import bitsandbytes.functional as bnbF

    from dtune.kernels import NF4Weight

    out = []
    for _ in range(copies):
        dense = (torch.randn(n, k, generator=gen) * 0.02).to(device=device, dtype=torch.bfloat16)
        packed, state = bnbF.quantize_4bit(
            dense, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.bfloat16
        )
        deq = bnbF.dequantize_4bit(packed, state)
        out.append({"packed": packed, "state": state, "nf4": NF4Weight.from_bnb(packed, state), "dense": deq})
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm().clamp(min=1e-30))


def bench_linear(k: int, n: int, tokens: list[int], timer: Timer, device: str, gen: torch.Generator) -> list[dict]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    from dtune.kernels import nf4_linear, nf4_matmul_grad_input

    copies = rotation(k, n, device)
    weights = make_weights(k, n, copies, device, gen)
    rows = []
    for t in tokens:
        xs = [torch.randn(t, k, generator=gen).to(device=device, dtype=torch.bfloat16) for _ in range(copies)]
        gs = [torch.randn(t, n, generator=gen).to(device=device, dtype=torch.bfloat16) for _ in range(copies)]
        w0, x0, g0 = weights[0], xs[0], gs[0]
        ref_y = x0.float() @ w0["dense"].float().T
        ref_gx = g0.float() @ w0["dense"].float()
        checks = {
            "fwd_ours": rel_err(nf4_linear(x0, w0["nf4"]), ref_y),
            "fwd_bnb": rel_err(bnb.matmul_4bit(x0, w0["packed"].t(), quant_state=w0["state"]), ref_y),
            "grad_ours": rel_err(nf4_matmul_grad_input(g0, w0["nf4"]), ref_gx),
        }
        if max(checks.values()) > 2e-2:
            raise SystemExit(f"check failed at K={k} N={n} tokens={t}: {checks}")

        def pick(i: int, xs=xs, gs=gs) -> tuple[dict, torch.Tensor, torch.Tensor]:
            return weights[i % copies], xs[i % copies], gs[i % copies]

        fwd = {
            "ours": timer(lambda i: nf4_linear(pick(i)[1], pick(i)[0]["nf4"])),
            "bnb": timer(lambda i: bnb.matmul_4bit(pick(i)[1], pick(i)[0]["packed"].t(), quant_state=pick(i)[0]["state"])),
            "bf16": timer(lambda i: torch.matmul(pick(i)[1], pick(i)[0]["dense"].T)),
        }
        grad = {
            "ours": timer(lambda i: nf4_matmul_grad_input(pick(i)[2], pick(i)[0]["nf4"])),
            "bnb": timer(lambda i: torch.matmul(pick(i)[2], bnbF.dequantize_4bit(pick(i)[0]["packed"], pick(i)[0]["state"]))),
            "bf16": timer(lambda i: torch.matmul(pick(i)[2], pick(i)[0]["dense"])),
        }
        for name, ms in (("forward", fwd), ("grad_x", grad)):
            flops = 2 * t * k * n
            rows.append(
                {
                    "in": k,
                    "out": n,
                    "tokens": t,
                    "pass": name,
                    "ms": ms,
                    "ours_over_bf16": ms["ours"] / ms["bf16"],
                    "bnb_over_ours": ms["bnb"] / ms["ours"],
                    "bf16_over_ours": ms["bf16"] / ms["ours"],
                    "tflops_ours": flops / ms["ours"] / 1e9,
                    "rel_err": checks["fwd_ours" if name == "forward" else "grad_ours"],
                    "rel_err_bnb": checks["fwd_bnb"] if name == "forward" else None,
                }
            )
    return rows


def bench_lora(
    k: int, n: int, tokens: list[int], ranks: list[int], timer: Timer, device: str, gen: torch.Generator
) -> list[dict]:
    import bitsandbytes as bnb

    from dtune.kernels import nf4_linear, nf4_lora_linear

    copies = rotation(k, n, device)
    weights = make_weights(k, n, copies, device, gen)
    scale = 2.0
    rows = []
    for r in ranks:
        a = (torch.randn(r, k, generator=gen) * 0.02).to(device=device, dtype=torch.bfloat16).requires_grad_()
        b = (torch.randn(n, r, generator=gen) * 0.02).to(device=device, dtype=torch.bfloat16).requires_grad_()

        def adapter(x: torch.Tensor, base: torch.Tensor, a=a, b=b) -> torch.Tensor:
            """PEFT's 4-bit LoRA forward after the base: clone, lora_B(lora_A(x)) * scaling, add."""
            return base.clone() + torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * scale

        ways = {
            "fused": lambda x, w, a=a, b=b: nf4_lora_linear(x, w["nf4"], a, b, scale),
            "unfused": lambda x, w: adapter(x, nf4_linear(x, w["nf4"])),
            "bnb": lambda x, w: adapter(x, bnb.matmul_4bit(x, w["packed"].t(), quant_state=w["state"])),
        }
        for t in tokens:
            xs = [
                torch.randn(t, k, generator=gen).to(device=device, dtype=torch.bfloat16).requires_grad_() for _ in range(copies)
            ]
            gs = [torch.randn(t, n, generator=gen).to(device=device, dtype=torch.bfloat16) for _ in range(copies)]
            with torch.no_grad():
                ref = xs[0].float() @ weights[0]["dense"].float().T + scale * (xs[0].float() @ a.float().T) @ b.float().T
                err = {way: rel_err(fn(xs[0], weights[0]), ref) for way, fn in ways.items()}
            if max(err.values()) > 2e-2:
                raise SystemExit(f"LoRA check failed at K={k} N={n} r={r} tokens={t}: {err}")

            def forward(fn, i: int, xs=xs) -> None:
                with torch.no_grad():
                    fn(xs[i % copies], weights[i % copies])

            def train(fn, i: int, xs=xs, gs=gs, a=a, b=b) -> None:
                x = xs[i % copies]
                x.grad = a.grad = b.grad = None
                fn(x, weights[i % copies]).backward(gs[i % copies])

            for name, pass_fn in (("forward", forward), ("train", train)):
                ms = {way: timer(lambda i, fn=fn, pass_fn=pass_fn: pass_fn(fn, i)) for way, fn in ways.items()}
                rows.append(
                    {
                        "in": k,
                        "out": n,
                        "tokens": t,
                        "r": r,
                        "pass": name,
                        "ms": ms,
                        "unfused_over_fused": ms["unfused"] / ms["fused"],
                        "bnb_over_fused": ms["bnb"] / ms["fused"],
                        "rel_err": err,
                    }
                )
    return rows


def bench_dequant(k: int, n: int, timer: Timer, device: str, gen: torch.Generator) -> dict:
    import bitsandbytes.functional as bnbF

    from dtune.kernels import nf4_dequantize

    copies = rotation(k, n, device)
    weights = make_weights(k, n, copies, device, gen)
    for w in weights:
        assert torch.equal(nf4_dequantize(w["nf4"]), w["dense"]), "nf4_dequantize is not bit-exact with bitsandbytes"
    numel = n * k
    # Fewest bytes: packed nibbles + uint8 absmax + second-level absmax (fp32) + the bf16 output.
    moved = numel // 2 + numel // 64 + 4 * math.ceil(numel / 64 / 256) + 2 * numel
    ours = timer(lambda i: nf4_dequantize(weights[i % copies]["nf4"]))
    theirs = timer(lambda i: bnbF.dequantize_4bit(weights[i % copies]["packed"], weights[i % copies]["state"]))
    return {
        "in": k,
        "out": n,
        "bytes": moved,
        "ms": {"ours": ours, "bnb": theirs},
        "GBps": {"ours": moved / ours / 1e6, "bnb": moved / theirs / 1e6},
        "bnb_over_ours": theirs / ours,
    }


def copy_bandwidth(timer: Timer, device: str, nbytes: int) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda i: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def print_table(result: dict) -> None:
    print(
        f"\n{result['versions']['device']} | torch {result['versions']['torch']} | triton {result['versions']['triton']}"
        f" | bitsandbytes {result['versions']['bitsandbytes']}"
    )
    print(
        f"{'in->out':>13} {'tokens':>6} {'pass':>8} {'ours ms':>9} {'bnb ms':>9} {'bf16 ms':>9} "
        f"{'ours/bf16':>9} {'bnb/ours':>8} {'TFLOP/s':>8}"
    )
    for r in result["linear"]:
        print(
            f"{r['in']:>6}->{r['out']:<6} {r['tokens']:>6} {r['pass']:>8} {r['ms']['ours']:>9.4f} {r['ms']['bnb']:>9.4f} "
            f"{r['ms']['bf16']:>9.4f} {r['ours_over_bf16']:>9.3f} {r['bnb_over_ours']:>8.2f} {r['tflops_ours']:>8.1f}"
        )
    copy = result["copy_GBps"]
    print(f"\ndevice-to-device copy: {copy:.0f} GB/s")
    for d in result["dequant"]:
        print(
            f"nf4_dequantize {d['in']}x{d['out']}: ours {d['GBps']['ours']:.0f} GB/s ({d['GBps']['ours'] / copy:.0%} of copy), "
            f"bnb {d['GBps']['bnb']:.0f} GB/s; ours {d['bnb_over_ours']:.2f}x faster"
        )
    if result["lora"]:
        print(
            f"\n{'LoRA in->out':>13} {'tokens':>6} {'r':>3} {'pass':>8} {'fused ms':>9} {'unfused':>9} {'bnb ms':>9} {'unfused/fused':>13} {'bnb/fused':>9}"
        )
    for r in result["lora"]:
        print(
            f"{r['in']:>6}->{r['out']:<6} {r['tokens']:>6} {r['r']:>3} {r['pass']:>8} {r['ms']['fused']:>9.4f} "
            f"{r['ms']['unfused']:>9.4f} {r['ms']['bnb']:>9.4f} {r['unfused_over_fused']:>13.3f} {r['bnb_over_fused']:>9.2f}"
        )
    for line in result["targets"]:
        print(line)


def targets(result: dict) -> list[str]:
    """The issue's targets, read off this run."""
    lines = []
    for r in result["linear"]:
        if (r["in"], r["out"], r["tokens"]) == (4096, 11008, 4096):
            lines.append(
                f"target {r['pass']} 4096->11008 @4096: ours/bf16 = {r['ours_over_bf16']:.3f} (<= 1.10), "
                f"bnb/ours = {r['bnb_over_ours']:.2f} (>= 1.3)"
            )
        if (r["in"], r["out"], r["tokens"], r["pass"]) == (4096, 11008, 1, "forward"):
            lines.append(f"target decode 4096->11008 @1: bf16/ours = {r['bf16_over_ours']:.2f} (>= 3.0)")
    for r in result["lora"]:
        if (r["in"], r["out"], r["tokens"], r["r"], r["pass"]) == (4096, 11008, 4096, 16, "train"):
            lines.append(
                f"LoRA fused 4096->11008 @4096 r16, train pass: unfused/fused = {r['unfused_over_fused']:.3f} "
                "(> 1: turn quant.fuse_lora on by default in conf/quant/nf4_triton.yaml)"
            )
    for d in result["dequant"]:
        lines.append(
            f"target dequant {d['in']}x{d['out']}: {d['GBps']['ours'] / result['copy_GBps']:.0%} of copy (>= 85%), "
            f"{d['bnb_over_ours']:.2f}x bnb (>= 1.15)"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--shapes", nargs="+", default=None, metavar="KxN", help="in x out features to time instead of --models' shapes"
    )
    parser.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    parser.add_argument("--lora-ranks", nargs="*", type=int, default=[16, 64], help="LoRA ranks (none: skip LoRA)")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default kernels/results/<device>.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        shapes, tokens, timer = [(128, 192), (192, 128)], [1, 16, 40], Timer(device, 1, 2)
        lora_shapes, lora_tokens, ranks = [(128, 192)], [40], [8]
        dequant_shapes, copy_bytes = [(128, 192)], 2**20
    else:
        if device != "cuda":
            sys.exit("bench_nf4: needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1 for a CPU dry run)")
        shapes = [s for m in args.models for s in MODELS[m]]
        if args.shapes:
            try:
                shapes = [(int(k), int(n)) for k, n in (s.lower().split("x") for s in args.shapes)]
            except ValueError:
                parser.error(f"--shapes: expected KxN pairs such as 4096x11008, got {args.shapes}")
        tokens, timer = args.tokens, Timer(device, args.warmup, args.reps)
        dequant_shapes, copy_bytes = [(4096, 11008), (8192, 28672)], 2**30
        lora_shapes, lora_tokens, ranks = dict.fromkeys(shapes), [t for t in tokens if t >= 512], args.lora_ranks
    gen = torch.Generator().manual_seed(0)
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "dtype": "bfloat16",
        "blocksize": 64,
        "double_quant": True,
        "timing": {"reps": timer.reps, "warmup": timer.warmup, "statistic": "median", "rotate_bytes": ROTATE_BYTES},
        "linear": [],
        "lora": [],
        "dequant": [],
    }
    out = args.out or Path(__file__).parent / "results" / (
        "smoke.json" if args.smoke else result["versions"]["device"].replace(" ", "_").lower() + ".json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every shape: a run cut short by a time limit keeps what it measured
        result["targets"] = targets(result)
        out.write_text(json.dumps(result, indent=1) + "\n")

    for k, n in dict.fromkeys(shapes):  # unique, in order
        result["linear"] += bench_linear(k, n, tokens, timer, device, gen)
        print(f"done {k}->{n}", file=sys.stderr, flush=True)
        save()
    for k, n in lora_shapes if ranks and lora_tokens else []:
        result["lora"] += bench_lora(k, n, lora_tokens, ranks, timer, device, gen)
        print(f"done LoRA {k}->{n}", file=sys.stderr, flush=True)
        save()
    result["copy_GBps"] = copy_bandwidth(timer, device, copy_bytes)
    result["dequant"] = [bench_dequant(k, n, timer, device, gen) for k, n in dequant_shapes]
    save()
    print_table(result)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
