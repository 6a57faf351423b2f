"""Two nodes over a real network stack: two network namespaces joined by a veth pair, one launch/torchrun.sh in
each (NNODES=2, NODE_RANK 0 and 1, one process per node), a 2-rank ZeRO-3 run to its end.

Both namespaces share this host's name, which resolves to loopback in each (as on clusters whose hostnames map to
127.0.1.1): the run only comes together with LOCAL_ADDR (torchrun's --local-addr and --rdzv-conf is_host, gloo bound
to the veth); without it the two nodes never meet.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ENV, REPO, SMOKE, free_port


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"ip {' '.join(args)}: {proc.stderr}"


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces: needs root"
    if not shutil.which("ip"):
        return "network namespaces: no `ip` (iproute2)"
    probe = f"dtune-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        return f"network namespaces: `ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


@contextlib.contextmanager
def two_nodes() -> Iterator[tuple[list[str], list[str], list[str]]]:
    """Namespaces ns0 and ns1 joined by veth0 <-> veth1 (10.77.N.1/24, 10.77.N.2/24); yields the namespace names,
    the interface names and the addresses. Deleting a namespace deletes its end of the pair, and with it the pair."""
    tag = os.getpid()
    names, links = [f"dtune{tag}-0", f"dtune{tag}-1"], [f"dtv{tag}a"[:15], f"dtv{tag}b"[:15]]
    subnet = f"10.77.{tag % 250}"
    addrs = [f"{subnet}.1", f"{subnet}.2"]
    try:
        for ns in names:
            _ip("netns", "add", ns)
        _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for ns, link, addr in zip(names, links, addrs, strict=True):
            _ip("link", "set", link, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", link)
            _ip("-n", ns, "link", "set", link, "up")
            _ip("-n", ns, "link", "set", "lo", "up")  # torchrun's workers talk to their agent over loopback
        yield names, links, addrs
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", links[0]], capture_output=True, timeout=30)  # if never moved


def _bytes_sent(ns: str, link: str) -> int:
    stats = json.loads(subprocess.run(["ip", "-n", ns, "-j", "-s", "link", "show", link], capture_output=True, text=True).stdout)
    return stats[0]["stats64"]["tx"]["bytes"]


@pytest.mark.integration
def test_two_nodes_in_network_namespaces_train_zero3_over_the_veth(tmp_path: Path):
    """Node 0 owns the rendezvous endpoint (its veth address) and hosts the store; node 1 reaches it only through
    the veth. The run ends on both, its results say 2 ranks, both agents met at the veth address, and each end of
    the pair carried the ZeRO-3 traffic (parameter all-gathers, gradient reduce-scatters) of the other rank."""
    if reason := _netns_unavailable():
        pytest.skip(reason)
    with two_nodes() as (names, links, addrs):
        env = {
            **ENV,
            "NNODES": "2",
            "NPROC_PER_NODE": "1",
            "MASTER_ADDR": addrs[0],
            "MASTER_PORT": str(free_port()),
            "JOB_ID": f"netns-{os.getpid()}",
            "LOGLEVEL": "INFO",  # torchrun's agents log the rendezvous they joined
        }
        sent_before = [_bytes_sent(ns, link) for ns, link in zip(names, links, strict=True)]
        nodes = []
        for rank, (ns, addr) in enumerate(zip(names, addrs, strict=True)):
            cmd = ["ip", "netns", "exec", ns, "bash", str(REPO / "launch" / "torchrun.sh"), *SMOKE, "engine=zero3"]
            node_env = {**env, "NODE_RANK": str(rank), "LOCAL_ADDR": addr}
            nodes.append(
                subprocess.Popen(cmd, cwd=tmp_path, env=node_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            )
        try:
            logs = [node.communicate(timeout=420)[0] for node in nodes]
        finally:
            for node in nodes:
                node.kill()
        for rank, (node, log) in enumerate(zip(nodes, logs, strict=True)):
            assert node.returncode == 0, f"node {rank}:\n{log[-4000:]}"
        sent = [_bytes_sent(ns, link) - before for ns, link, before in zip(names, links, sent_before, strict=True)]

    out = tmp_path / "outputs" / f"torchrun-{env['JOB_ID']}"
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 3
    assert (out / "dtune_rank1.log").is_file()  # the second rank ran, on the other node
    for log in logs:
        rdzv = re.search(r"Rendezvous complete for workers.*?master_addr=(\S+).*?group_world_size=(\d+)", log, re.DOTALL)
        assert rdzv, log[-3000:]
        assert rdzv.group(1) == addrs[0] and rdzv.group(2) == "2"
    # The 4-bit base is ~12 MB (results: param_bytes_rank0); ZeRO-3 moves a good part of it across each step.
    assert min(sent) > 1_000_000, sent
