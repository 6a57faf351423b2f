#!/usr/bin/env bash
# Launch dtune on this node under torchrun; run the same command on every node of a multi-node job.
#
#   launch/torchrun.sh engine=zero3 model.name_or_path=/models/llama-8b model.gradient_checkpointing=true  # one node, all its GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh engine=fsdp2 ...      # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh engine=fsdp2 ...      # on node1
#
# NPROC_PER_NODE: processes per node (default: visible GPUs, or 1). MASTER_PORT: default 29500. JOB_ID: the
# rendezvous id, also the name of the job's output directory (outputs/torchrun-<JOB_ID>), the same on all nodes.
# SHUTDOWN_TIMEOUT: seconds the dtune processes get to checkpoint after a stop signal (default 170).
# LOCAL_ADDR: the address the other nodes reach this node at (torchrun --local-addr; default: torchrun looks up this
# host's name). Needed where a node's hostname resolves to loopback (127.0.1.1, or one name shared by containers or
# network namespaces): each node would advertise a name that every node resolves to itself. With
# LOCAL_ADDR set, this node hosts the rendezvous store (--rdzv-conf is_host) exactly when LOCAL_ADDR is MASTER_ADDR,
# so give the rendezvous node's MASTER_ADDR in the same form (an IP address on every node): whichever node owns the
# endpoint must serve it, whatever its NODE_RANK (c10d ranks nodes by arrival, not by NODE_RANK). gloo is bound to
# the interface holding LOCAL_ADDR too (GLOO_SOCKET_IFNAME).
# Arguments are dtune overrides (key=value). Sweeps: dtune train --multirun (launcher=slurm on a cluster), not torchrun.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
[[ -n "${JOB_ID:-}" ]] && JOB_ID_SET=1
JOB_ID="${JOB_ID:-dtune-$(date +%Y%m%d-%H%M%S)}"
if [[ "$NNODES" -gt 1 && -z "${JOB_ID_SET:-}" && "$JOB_ID" == dtune-2* ]]; then
    # Each node would compute its own timestamp: a multi-node job needs an id fixed by whoever starts it.
    echo "launch/torchrun.sh: set JOB_ID to the same value on every node of a multi-node job" >&2
    exit 2
fi

ADDR_ARGS=() # expanded as ${ADDR_ARGS[@]+...}: bash < 4.4 calls an empty array unbound under set -u
if [[ -n "${LOCAL_ADDR:-}" ]]; then
    is_host=false
    [[ "$LOCAL_ADDR" == "$MASTER_ADDR" ]] && is_host=true
    ADDR_ARGS=(--local-addr "$LOCAL_ADDR" --rdzv-conf "is_host=$is_host")
    # gloo (CPU collectives) binds to the address of this host's name, loopback there too: bind it to the interface
    # that holds LOCAL_ADDR (an IP address) unless GLOO_SOCKET_IFNAME says otherwise. NCCL does not go by the name.
    if [[ -z "${GLOO_SOCKET_IFNAME:-}" ]] && command -v ip >/dev/null; then
        ifname="$(ip -o addr show | awk -v a="$LOCAL_ADDR" '{ split($4, p, "/") } p[1] == a { print $2; exit }')"
        if [[ -n "$ifname" ]]; then export GLOO_SOCKET_IFNAME="$ifname"; fi
    fi
fi

# SIGUSR1/SIGUSR2 (Slurm's and submitit's warnings), SIGTERM and Ctrl-C are passed on to torchrun, which forwards them
# to the dtune processes: they finish their step, write a checkpoint and exit 75 (130 for Ctrl-C); torchrun waits
# SHUTDOWN_TIMEOUT seconds for them before killing them. torchrun itself exits 1 for any stop, so dtune's first
# process on each node says how the run ended in $DTUNE_STATUS_FILE (slurm/job.sh sets it; else a file of this
# script's own), and this script exits with that: 0 done, 75 preempted (requeue), 130 interrupted, else torchrun's.
own_status=""
if [[ -z "${DTUNE_STATUS_FILE:-}" ]]; then
    DTUNE_STATUS_FILE="$(mktemp -u "${TMPDIR:-/tmp}/dtune-status-XXXXXXXX")"
    export DTUNE_STATUS_FILE
    own_status=1
fi
rm -f "$DTUNE_STATUS_FILE" # an earlier run's record must not speak for this one (written only after the rendezvous)

# Signals that come before torchrun has started are passed on once it has.
torchrun_pid=""
early=""
forward() {
    if [[ -n "$torchrun_pid" ]]; then kill -s "$1" "$torchrun_pid" 2>/dev/null || true; else early="$1"; fi
}
for sig in TERM INT HUP QUIT USR1 USR2; do
    trap "forward $sig" "$sig"
done
# torchrun in a session of its own, so that a signal reaches it once, from here (a terminal's Ctrl-C goes to the
# whole foreground group: torchrun would get it twice, and a second Ctrl-C stops dtune without a checkpoint). A
# background command of a script starts with SIGINT and SIGQUIT ignored and stdin from /dev/null: the shim below
# restores both signals (or torchrun, waiting for its peers, and dtune, setting up, would ignore Ctrl-C) and the
# explicit <&0 keeps stdin; then it leaves this session and execs torchrun, so $! is torchrun.
"$PYTHON" -c '
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
signal.signal(signal.SIGQUIT, signal.SIG_DFL)
try:
    os.setsid()
except OSError:  # already a session leader
    pass
os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", *sys.argv[1:]])
' --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$JOB_ID" ${ADDR_ARGS[@]+"${ADDR_ARGS[@]}"} \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-170}" \
    -m dtune.train "$@" <&0 &
torchrun_pid=$!
if [[ -n "$early" ]]; then forward "$early"; fi
set +e
while :; do
    wait "$torchrun_pid"
    rc=$?
    kill -0 "$torchrun_pid" 2>/dev/null || break # wait also returns when a trapped signal arrives: keep waiting
done
if ((rc > 128)); then # the last wait may have been cut by a signal as torchrun ended: ask for its own status
    wait "$torchrun_pid" 2>/dev/null
    again=$?
    ((again != 127)) && rc=$again
fi
status="$(cat "$DTUNE_STATUS_FILE" 2>/dev/null)"
[[ -n "$own_status" ]] && rm -f "$DTUNE_STATUS_FILE"
case "$status" in
    *'"status": "done"'*) exit 0 ;; # finished, even where torchrun exits 1 for a stop signal that came during the end
    *'"status": "preempted"'*)
        echo "launch/torchrun.sh: dtune wrote a checkpoint and stopped (torchrun exited $rc): exit 75, requeue to resume" >&2
        exit 75
        ;;
    *'"status": "interrupted"'*)
        echo "launch/torchrun.sh: dtune wrote a checkpoint and stopped at Ctrl-C (torchrun exited $rc): exit 130" >&2
        exit 130
        ;;
esac
exit "$rc"
