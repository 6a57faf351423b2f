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

# SIGUSR1/SIGUSR2 (Slurm's and submitit's warnings) and SIGTERM are forwarded to the dtune processes, which finish
# their step, write a checkpoint and exit 75; torchrun waits SHUTDOWN_TIMEOUT seconds for them before killing them.
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$JOB_ID" ${ADDR_ARGS[@]+"${ADDR_ARGS[@]}"} \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-170}" \
    -m dtune.train "$@"
