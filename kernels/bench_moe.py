"""Benchmark the grouped NF4 experts kernel beside a 16-bit grouped matmul and bitsandbytes' per-expert path.

    python kernels/bench_moe.py                              # Qwen3-30B-A3B experts, writes kernels/results/moe-<gpu>.json
    python kernels/bench_moe.py --tokens 512 4096 16384
    TRITON_INTERPRET=1 python kernels/bench_moe.py --smoke   # CPU, tiny shapes: checks the harness runs
                                                             # (rows of 64: bitsandbytes' CPU dequantize is wrong for
                                                             # blocks that straddle rows)

One MoE layer of Qwen3-30B-A3B's shape (128 experts, hidden 2048, expert intermediate 768, top-8): tokens are routed
by a random router whose logits favour some experts (a per-expert bias of standard deviation ``--skew``, so the
groups are uneven, as trained routers' are), then grouped by expert. For each projection (gate_up: 2048 -> 1536,
down: 768 -> 2048) and token count, forward and input gradient, three ways:

* ``nf4``  -- dtune's grouped NF4 kernel (``nf4_grouped_matmul`` / ``_grad_input``): the packed experts dequantized
  tile by tile on chip, one launch for all experts;
* ``bf16`` -- the 16-bit experts: ``torch._grouped_mm`` where this torch has it (one launch), else a matmul per expert
  (the floor a 4-bit method chases, holding 4x the bytes);
* ``bnb``  -- bitsandbytes' way for experts it does not fuse: per expert with tokens, ``dequantize_4bit`` then a
  matmul (what dtune's ``quant.kernel=bnb`` runs).

and, for LoRA r``--lora-rank`` on every expert (PEFT's layout: s (x A_e^T) B_e^T), one training pass (both grouped
matmuls forward, then backward into x, A and B), two ways: ``grouped`` -- ``dtune.kernels.grouped_dense``
(``torch._grouped_mm``: one launch a matmul) -- and ``loop`` -- a matmul per expert (what runs where the grouped GEMM
does not).

Timing: CUDA events, warm-up first, median over repetitions, rotating over copies of the experts so L2 does not
flatter. Every case is checked against an fp32 reference first. Prints a table with ratios; writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nf4 import Timer, rel_err, versions

QWEN3_30B_A3B = {"experts": 128, "hidden": 2048, "intermediate": 768, "top_k": 8}
TOKENS = [512, 4096, 16384]


def route(tokens: int, experts: int, top_k: int, skew: float, device: str, gen: torch.Generator) -> torch.Tensor:
    """top-k expert indices [tokens, top_k] of a random router with a per-expert bias (uneven groups)."""
    logits = torch.randn(tokens, experts, generator=gen) + skew * torch.randn(experts, generator=gen)
    return logits.topk(top_k, dim=-1).indices.to(device)


def grouped_bf16(x: torch.Tensor, dense: torch.Tensor, offsets: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """x [M, K] sorted by expert @ dense[e]^T: torch._grouped_mm (CUDA, bf16) when present, else a loop."""
    if x.is_cuda and hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(x, dense.transpose(-2, -1), offs=offsets[1:].to(torch.int32))
    out = x.new_empty(x.shape[0], dense.shape[1])
    for e in range(dense.shape[0]):
        if bounds[e + 1] > bounds[e]:
            out[bounds[e] : bounds[e + 1]] = x[bounds[e] : bounds[e + 1]] @ dense[e].t()
    return out


def per_expert_bnb(x: torch.Tensor, copy: dict[str, Any], bounds: list[int], grad_input: bool) -> torch.Tensor:
    """bitsandbytes, per expert with rows: dequantize_4bit, then the matmul."""
    import bitsandbytes.functional as bnbF

    n, k = copy["shape"][1:]
    out = x.new_empty(x.shape[0], k if grad_input else n)
    for e, (packed, state) in enumerate(copy["bnb"]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            w = bnbF.dequantize_4bit(packed, state)
            out[lo:hi] = x[lo:hi] @ w if grad_input else x[lo:hi] @ w.t()
    return out


def make_experts(experts: int, n: int, k: int, copies: int, device: str, gen: torch.Generator) -> list[dict[str, Any]]:
    import bitsandbytes.functional as bnbF

    from dtune.kernels.nf4_grouped import NF4Experts

    out = []
    for _ in range(copies):
        weight = (torch.randn(experts, n, k, generator=gen) * 0.02).to(device=device, dtype=torch.bfloat16)
        nf4 = NF4Experts.quantize(weight)
        bnb = [bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4") for w in weight]
        out.append({"nf4": nf4, "bnb": bnb, "dense": nf4.dequantize(), "shape": (experts, n, k)})
    return out


def _cases(weights: list[dict[str, Any]], inp: torch.Tensor, grad: bool, offsets: torch.Tensor, bounds: list[int]) -> dict:
    """The three ways, each a function of the repetition index (rotating over the copies of the experts)."""
    from dtune.kernels.nf4_grouped import nf4_grouped_matmul, nf4_grouped_matmul_grad_input

    ours = nf4_grouped_matmul_grad_input if grad else nf4_grouped_matmul
    copies = len(weights)

    def dense(i: int) -> torch.Tensor:
        w = weights[i % copies]["dense"]
        return w.transpose(-2, -1) if grad else w

    return {
        "nf4": lambda i: ours(inp, weights[i % copies]["nf4"], offsets),
        "bf16": lambda i: grouped_bf16(inp, dense(i), offsets, bounds),
        "bnb": lambda i: per_expert_bnb(inp, weights[i % copies], bounds, grad),
    }


def bench_projection(name: str, n: int, k: int, shape: dict, tokens: list[int], args: Any, timer: Timer, device: str) -> list:
    from dtune.kernels.nf4_grouped import group_by_expert, nf4_grouped_matmul_grad_input_ref, nf4_grouped_matmul_ref

    gen = torch.Generator().manual_seed(0)
    experts = shape["experts"]
    copies = 2 if device == "cpu" else max(2, min(4, (256 << 20) // (experts * n * k * 2)))
    weights = make_experts(experts, n, k, copies, device, gen)
    rows = []
    for t in tokens:
        top = route(t, experts, shape["top_k"], args.skew, device, gen)
        _, offsets = group_by_expert(top, experts)
        bounds = offsets.tolist()
        m = t * shape["top_k"]
        x = (torch.randn(m, k, generator=gen) * 0.5).to(device=device, dtype=torch.bfloat16)
        g = (torch.randn(m, n, generator=gen) * 0.5).to(device=device, dtype=torch.bfloat16)
        row: dict[str, Any] = {"projection": name, "n": n, "k": k, "tokens": t, "rows": m}
        counts = [bounds[e + 1] - bounds[e] for e in range(experts)]
        row["rows_per_expert"] = {"min": min(counts), "max": max(counts), "mean": m / experts}
        for what, inp in (("forward", x), ("grad_x", g)):
            grad = what == "grad_x"
            ref = (nf4_grouped_matmul_grad_input_ref if grad else nf4_grouped_matmul_ref)(inp.float(), weights[0]["nf4"], offsets)
            cases = _cases(weights, inp, grad, offsets, bounds)
            for case, fn in cases.items():
                err = rel_err(fn(0), ref)
                if err > 2e-2:
                    raise AssertionError(f"{name} {what} {case} at {t} tokens: relative error {err:.2e} against fp32")
                row[f"{what}_{case}_ms"] = timer(fn)
                row[f"{what}_{case}_rel_err"] = err
            row[f"{what}_bnb_over_nf4"] = row[f"{what}_bnb_ms"] / row[f"{what}_nf4_ms"]
            row[f"{what}_nf4_over_bf16"] = row[f"{what}_nf4_ms"] / row[f"{what}_bf16_ms"]
        if args.lora_rank:
            row.update(bench_lora(x, g, n, k, experts, args.lora_rank, offsets, timer, gen))
        nf4 = weights[0]["nf4"]
        row["bytes_nf4"], row["bytes_bf16"] = nf4.nbytes(), experts * n * k * 2
        rows.append(row)
        print(f"done {name} {t} tokens", file=sys.stderr, flush=True)
    return rows


def bench_lora(x, g, n, k, experts, rank, offsets, timer, gen) -> dict[str, Any]:
    """One LoRA training pass over every expert's rows: grouped GEMM vs a matmul per expert (ms, and the ratio)."""
    from dtune.kernels.grouped_dense import ExpertRows, grouped_dense, grouped_dense_loop, grouped_mm_fits

    a = (torch.randn(experts, rank, k, generator=gen) * 0.02).to(x.device, x.dtype).requires_grad_()
    b = (torch.randn(experts, n, rank, generator=gen) * 0.02).to(x.device, x.dtype).requires_grad_()
    x = x.detach().requires_grad_()

    def step(fn):
        def run(i: int) -> torch.Tensor:
            rows = ExpertRows(offsets)  # a fresh grouping each pass: the loop pays its copy to the host every time
            y = fn(fn(x, a, rows), b, rows)
            y.backward(g)
            return y

        return run

    grouped, loop = step(grouped_dense), step(grouped_dense_loop)
    err = rel_err(grouped(0).detach(), loop(0).detach().float())
    if err > 2e-2:
        raise AssertionError(f"LoRA grouped vs loop: relative error {err:.2e}")
    fits = grouped_mm_fits(x, a) and grouped_mm_fits(x.new_empty(x.shape[0], rank), b)  # both matmuls
    out = {"lora_rank": rank, "lora_grouped_gemm": fits, "lora_grouped_ms": timer(grouped)}
    out["lora_loop_ms"] = timer(loop)
    out["lora_loop_over_grouped"] = out["lora_loop_ms"] / out["lora_grouped_ms"]
    return out


def print_table(result: dict) -> None:
    print(f"\nMoE experts {result['shape']} on {result['versions']['device']}, bf16; ms (median)")
    head = f"{'projection':<10}{'tokens':>7}{'rows/expert':>14}"
    for what in ("forward", "grad_x"):
        head += f"{what + ' nf4':>14}{'bf16':>8}{'bnb':>9}{'bnb/nf4':>9}{'nf4/bf16':>9}"
    print(head)
    for r in result["rows"]:
        spread = f"{r['rows_per_expert']['min']}-{r['rows_per_expert']['max']}"
        line = f"{r['projection']:<10}{r['tokens']:>7}{spread:>14}"
        for what in ("forward", "grad_x"):
            line += f"{r[f'{what}_nf4_ms']:>14.3f}{r[f'{what}_bf16_ms']:>8.3f}{r[f'{what}_bnb_ms']:>9.3f}"
            line += f"{r[f'{what}_bnb_over_nf4']:>8.2f}x{r[f'{what}_nf4_over_bf16']:>8.2f}x"
        print(line)
    if "lora_grouped_ms" in result["rows"][0]:
        print(f"\nLoRA r{result['rows'][0]['lora_rank']} on every expert, one training pass; ms (median)")
        print(f"{'projection':<10}{'tokens':>7}{'grouped':>10}{'loop':>10}{'loop/grouped':>14}  grouped GEMM")
        for r in result["rows"]:
            print(
                f"{r['projection']:<10}{r['tokens']:>7}{r['lora_grouped_ms']:>10.3f}{r['lora_loop_ms']:>10.3f}"
                f"{r['lora_loop_over_grouped']:>13.2f}x  {'yes' if r['lora_grouped_gemm'] else 'no (loop)'}"
            )
    r = result["rows"][0]
    print(f"experts of one projection: {r['bytes_nf4'] / 2**20:.1f} MiB in NF4 vs {r['bytes_bf16'] / 2**20:.1f} MiB in bf16")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    parser.add_argument("--skew", type=float, default=1.0, help="std of the router's per-expert bias (0: even groups)")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank on every expert (0: no LoRA timing)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default kernels/results/moe-<device>.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        shape, tokens, timer = {"experts": 4, "hidden": 128, "intermediate": 64, "top_k": 2}, [24], Timer(device, 1, 2)
    else:
        if device != "cuda":
            sys.exit("bench_moe: needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1 for a CPU dry run)")
        shape, tokens, timer = QWEN3_30B_A3B, args.tokens, Timer(device, args.warmup, args.reps)
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "shape": shape,
        "skew": args.skew,
        "grouped_bf16": "torch._grouped_mm" if device == "cuda" and hasattr(torch, "_grouped_mm") else "matmul per expert",
        "timing": {"reps": timer.reps, "warmup": timer.warmup, "statistic": "median"},
        "autotune_configs": os.environ.get("DTUNE_NF4_AUTOTUNE_CONFIGS", "all"),
        "rows": [],
    }
    out = args.out or Path(__file__).parent / "results" / (
        "moe-smoke.json" if args.smoke else "moe-" + result["versions"]["device"].replace(" ", "_").lower() + ".json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    h, i = shape["hidden"], shape["intermediate"]
    for name, n, k in (("gate_up", 2 * i, h), ("down", h, i)):
        result["rows"] += bench_projection(name, n, k, shape, tokens, args, timer, device)
        out.write_text(json.dumps(result, indent=1) + "\n")  # after each projection: a run cut short keeps it
    print_table(result)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
