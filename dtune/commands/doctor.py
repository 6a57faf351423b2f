"""``dtune doctor``: check a cluster allocation before training on it.

Run it the way training runs -- ``torchrun --nproc_per_node 8 -m dtune doctor``, ``launch/torchrun.sh``-style on
every node, or ``srun --ntasks-per-node 8 dtune doctor`` (ranks from Slurm's variables). Every rank reports its host,
devices and versions; rank 0 checks that they agree, times a barrier, measures all-reduce bandwidth over a range of
sizes, and sends a message along every link of the ring (rank r -> r+1) to find the slowest one. Exit status 1 when
something is wrong (mismatched versions, a rank without its GPU, a link far slower than the rest).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from dtune.distributed.env import slurm_process_env
from dtune.errors import DtuneError
from dtune.units import parse_bytes

RENDEZVOUS_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "SLURM_JOB_ID",
    "SLURM_PROCID",
    "SLURM_NODEID",
    "CUDA_VISIBLE_DEVICES",
)
PACKAGES = ("dtune", "transformers", "peft", "bitsandbytes", "accelerate", "deepspeed", "triton")
SLOW_LINK = 0.5  # a link slower than this fraction of the median link is reported as a problem


def package_version(package: str) -> str | None:
    """The installed version of a distribution, or None where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def local_report() -> dict[str, Any]:
    """What this process sees: host, devices, versions, rendezvous variables."""
    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "env": {k: os.environ[k] for k in RENDEZVOUS_VARS if k in os.environ},
        "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
        "packages": {p: package_version(p) for p in PACKAGES},
    }
    if cuda:
        free, total = torch.cuda.mem_get_info()
        report["gpu_memory_gib"] = round(total / 2**30, 1)
        report["gpu_free_gib"] = round(free / 2**30, 1)
    return report


def init(timeout_s: float) -> torch.device:
    """Join the job's process group (env:// rendezvous; Slurm's variables when srun started the ranks)."""
    os.environ.update(slurm_process_env())
    cuda = torch.cuda.is_available()
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if cuda else None,
        )
    return device


def _local_median(fn: Any, device: torch.device, iters: int) -> float:
    """This rank's median seconds of ``fn()`` over ``iters`` runs, all ranks starting each run together."""
    times = []
    for _ in range(iters):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timed(fn: Any, device: torch.device, iters: int) -> float:
    """Seconds of a collective ``fn()``: the slowest rank's median (it bounds the collective)."""
    median = torch.tensor(_local_median(fn, device, iters), dtype=torch.float64, device=device)  # NCCL reduces on the GPU
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return float(median)


def allreduce_bandwidth(device: torch.device, sizes: list[int], iters: int) -> list[dict[str, float]]:
    """All-reduce of fp32 buffers: algorithm and bus bandwidth (nccl-tests' definitions) per size."""
    world = dist.get_world_size()
    rows = []
    for size in sizes:
        buffer = torch.ones(size // 4, dtype=torch.float32, device=device)
        dist.all_reduce(buffer)  # warm-up (connections, NCCL channels)
        seconds = _timed(lambda b=buffer: dist.all_reduce(b), device, iters)
        algbw = size / seconds / 1e9
        rows.append({"bytes": size, "seconds": seconds, "algbw_GBps": algbw, "busbw_GBps": algbw * 2 * (world - 1) / world})
    return rows


def ring_links(device: torch.device, size: int, iters: int) -> list[dict[str, Any]]:
    """Every rank sends ``size`` bytes to the next rank and receives from the previous one, all links at once;
    returns each link's bandwidth (rank 0 gets them all)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    send = torch.ones(size // 4, dtype=torch.float32, device=device)
    recv = torch.empty_like(send)

    def exchange() -> None:
        ops = [dist.P2POp(dist.isend, send, (rank + 1) % world), dist.P2POp(dist.irecv, recv, (rank - 1) % world)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()

    exchange()  # warm-up
    mine = {"src": rank, "dst": (rank + 1) % world, "seconds": _local_median(exchange, device, iters)}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    for link in gathered:
        link["GBps"] = size / link["seconds"] / 1e9
    return gathered


def slow_links(links: list[dict[str, Any]], fraction: float = SLOW_LINK) -> list[dict[str, Any]]:
    """The links slower than ``fraction`` of the median link (none when there is one link or ``fraction`` is 0)."""
    if len(links) < 2 or fraction <= 0:
        return []
    median = statistics.median(link["GBps"] for link in links)
    return [link for link in links if link["GBps"] < fraction * median]


def best_of(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each link's faster measurement of two rounds: a link is slow only if it is slow both times, so a rank that
    was descheduled for one round (a busy host) is not reported as a bad link."""
    return [max(a, b, key=lambda link: link["GBps"]) for a, b in zip(first, second, strict=True)]


def diagnose(reports: list[dict[str, Any]], links: list[dict[str, Any]], slow_link: float = SLOW_LINK) -> list[str]:
    """Problems found in the ranks' reports and the link measurements (``slow_link``: see :func:`slow_links`)."""
    problems = []
    for key in ("torch", "cuda", "nccl", "python"):
        values = {r[key] for r in reports}
        if len(values) > 1:
            problems.append(f"{key} differs between ranks: {sorted(map(str, values))}")
    for package in PACKAGES:
        values = {r["packages"][package] for r in reports}
        if len(values) > 1:
            problems.append(f"{package} differs between ranks: {sorted(map(str, values))}")
    if any(r["gpus"] for r in reports):
        for rank, r in enumerate(reports):
            local = int(r["env"].get("LOCAL_RANK", "0"))
            if local >= len(r["gpus"]):
                problems.append(f"rank {rank} on {r['host']}: LOCAL_RANK {local} but {len(r['gpus'])} GPU(s) visible")
    if slow := slow_links(links, slow_link):
        median = statistics.median(link["GBps"] for link in links)
        for link in slow:
            problems.append(
                f"slow link: rank {link['src']} ({reports[link['src']]['host']}) -> rank {link['dst']} "
                f"({reports[link['dst']]['host']}): {link['GBps']:.2f} GB/s, median {median:.2f} GB/s"
            )
    return problems


def format_report(result: dict[str, Any]) -> str:
    reports = result["ranks"]
    lines = [f"dtune doctor: {len(reports)} rank(s) on {len({r['host'] for r in reports})} host(s)"]
    lines.append(f"{'rank':>4}  {'host':<20}{'local':>6}  {'GPU':<28}torch / CUDA / NCCL")
    for rank, r in enumerate(reports):
        local = r["env"].get("LOCAL_RANK", "0")
        gpu = r["gpus"][int(local) % len(r["gpus"])] if r["gpus"] else "-"
        lines.append(f"{rank:>4}  {r['host']:<20}{local:>6}  {gpu[:27]:<28}{r['torch']} / {r['cuda']} / {r['nccl']}")
    if "barrier_ms" in result:
        lines.append(f"barrier: {result['barrier_ms']:.2f} ms (median, slowest rank)")
    if result.get("allreduce"):
        lines.append(f"{'all-reduce size':>16}{'time':>12}{'algbw':>12}{'busbw':>12}")
        for row in result["allreduce"]:
            lines.append(
                f"{row['bytes'] / 2**20:>12.1f} MiB{row['seconds'] * 1e3:>9.2f} ms{row['algbw_GBps']:>8.2f} GB/s{row['busbw_GBps']:>8.2f} GB/s"
            )
    if result.get("links"):
        slowest = min(result["links"], key=lambda link: link["GBps"])
        fastest = max(result["links"], key=lambda link: link["GBps"])
        host = lambda r: reports[r]["host"]  # noqa: E731
        lines.append(
            f"slowest link: rank {slowest['src']} ({host(slowest['src'])}) -> rank {slowest['dst']} ({host(slowest['dst'])}) "
            f"{slowest['GBps']:.2f} GB/s; fastest {fastest['GBps']:.2f} GB/s ({len(result['links'])} links"
            + (", best of 2 rounds)" if result.get("link_rounds", 1) > 1 else ")")
        )
    lines.extend(f"PROBLEM: {p}" for p in result["problems"]) if result["problems"] else lines.append("no problems found")
    return "\n".join(lines)


def run(sizes: list[int], iters: int, link_bytes: int, timeout_s: float, slow_link: float = SLOW_LINK) -> dict[str, Any]:
    """Every rank calls this; rank 0's return value holds the whole report."""
    device = init(timeout_s)
    mine = local_report()
    if not (dist.is_available() and dist.is_initialized()):
        return {"ranks": [mine], "problems": diagnose([mine], []), "allreduce": [], "links": []}
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine)
    result: dict[str, Any] = {"ranks": reports}
    result["barrier_ms"] = _timed(dist.barrier, device, iters) * 1e3
    result["allreduce"] = allreduce_bandwidth(device, sizes, iters)
    result["links"], result["link_rounds"] = ring_links(device, link_bytes, iters), 1
    if slow_links(result["links"], slow_link):  # every rank holds the same links, so all of them measure again
        result["links"], result["link_rounds"] = best_of(result["links"], ring_links(device, link_bytes, iters)), 2
    result["problems"] = diagnose(reports, result["links"], slow_link)
    dist.barrier()
    dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> int:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="dtune doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1M,16M,128M,512M" if gpu else "64K,1M,8M", help="all-reduce sizes (comma-separated)")
    parser.add_argument("--link-size", default="64M" if gpu else "1M", help="bytes sent along each ring link")
    parser.add_argument("--iters", type=int, default=10 if gpu else 5, help="timed repetitions per measurement")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the other ranks")
    parser.add_argument(
        "--slow-link",
        type=float,
        default=SLOW_LINK,
        help="report a link slower than this fraction of the median link, in two rounds (0: never)",
    )
    parser.add_argument("--json", help="also write the full report to this file (rank 0)")
    args = parser.parse_args(argv)
    try:
        sizes = [parse_bytes(s, "--sizes") for s in args.sizes.split(",")]
        if not 0 <= args.slow_link < 1:
            raise ValueError(f"--slow-link must be a fraction in [0, 1), got {args.slow_link}")
        result = run(sizes, args.iters, parse_bytes(args.link_size, "--link-size"), args.timeout, args.slow_link)
    except (RuntimeError, ValueError, DtuneError) as err:  # rendezvous timeouts, unreachable MASTER_ADDR, bad sizes
        print(f"dtune doctor: error on {socket.gethostname()} (RANK={os.environ.get('RANK', '?')}): {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_report(result), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return 1 if result.get("problems") else 0


if __name__ == "__main__":
    sys.exit(main())
