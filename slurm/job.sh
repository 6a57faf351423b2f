#!/usr/bin/env bash
# Body of dtune's sbatch scripts, run by the batch shell inside the allocation:
#   one torchrun per node (srun), rendezvous on the first host of the allocation, preemption and requeue.
#
# Slurm signals this shell (--signal=B:USR1@<seconds>) before the time limit; it forwards USR1 through srun to
# torchrun on every node, which forwards it to the dtune processes (launch/torchrun.sh): they finish the step in
# hand, write a checkpoint and exit. This script then requeues the job (scontrol requeue): the same job id comes
# back, writes into the same outputs/slurm-<jobid>/, and resumes from the checkpoint (train.resume=auto). A run
# that stopped on a signal Slurm sent to its processes directly (preemption) is requeued too: dtune reports its
# ending in $DTUNE_STATUS_FILE.
#
# srun runs in a session (and process group) of its own. srun answers SIGTERM, SIGHUP and SIGQUIT by SIGKILLing its
# tasks at once ("srun: forcing job termination"; it resets an inherited SIG_IGN, so `trap '' TERM` cannot stop it),
# and `scancel --signal=TERM --full` signals the batch step's process group (22.05 slurmstepd: killpg), srun included,
# but no other step: dtune never saw the TERM and died without a checkpoint (exit 137). Out of that group, srun is not
# signalled; this shell traps the TERM and hands it to the training step itself (scancel, steps only), as Slurm does
# on preemption. (At a time limit Slurm signals every process of the batch step, srun too, under proctrack/cgroup and
# linuxproc: the --signal warning of the sbatch scripts is what gets a checkpoint written before it.)
#
# Environment: DTUNE_REPO (the checkout; default: the directory sbatch was called from), NPROC_PER_NODE
# (default: the GPUs Slurm gave each node), MASTER_PORT (default: derived from the job id).
# LOCAL_ADDR (launch/torchrun.sh) is not set here: it is each node's own address, and this shell runs on the first
# node only; the nodes meet at the first node's name, which on a Slurm cluster resolves to an address the others
# reach. Where node names resolve to loopback instead, torchrun.sh's LOCAL_ADDR must be set on each node (and
# MASTER_ADDR to the first node's address), e.g. from a wrapper that srun starts in place of torchrun.sh.
set -uo pipefail
REPO="${DTUNE_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
if [[ ! -f "$REPO/launch/torchrun.sh" ]]; then
    echo "slurm/job.sh: $REPO is not a dtune checkout; submit from the repository root or set DTUNE_REPO" >&2
    exit 2
fi
: "${SLURM_JOB_ID:?slurm/job.sh runs inside a Slurm allocation (sbatch slurm/dtune-1node.sbatch ...)}"

MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_ADDR
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export NNODES="${SLURM_NNODES:-1}"
export JOB_ID="$SLURM_JOB_ID" # torchrun's rendezvous id; dtune names the output dir outputs/slurm-<jobid>
if [[ -z "${NPROC_PER_NODE:-}" && -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    export NPROC_PER_NODE="$SLURM_GPUS_ON_NODE"
fi
echo "dtune: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NNODES node(s): $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT"

# dtune's rank 0 writes how the run ended here ("done", "preempted", or "interrupted" by Ctrl-C: not requeued):
# torchrun exits 1 for any stop, so its status cannot tell a checkpointed stop from a crash. On the submit
# directory's filesystem, which every node shares.
export DTUNE_STATUS_FILE="${DTUNE_STATUS_FILE:-$PWD/outputs/.dtune-status-$SLURM_JOB_ID.json}"
rm -f "$DTUNE_STATUS_FILE"

warned=""
on_usr1() {
    warned=1
    echo "dtune: USR1 received (time limit near); dtune checkpoints after the current step and stops"
    kill -s USR1 "$srun_pid" 2>/dev/null
}
trap on_usr1 USR1
on_term() {
    # Preemption and plain scancel --signal=TERM signal the training step directly and not this shell; a TERM here
    # came to the batch step (scancel --full): pass it on to the training step (all its processes, on every node);
    # if scancel cannot reach slurmctld, as USR1 through srun (srun forwards it; dtune stops on it the same way).
    echo "dtune: TERM received; dtune checkpoints after the current step and stops"
    scancel --signal=TERM "$SLURM_JOB_ID" || kill -s USR1 "$srun_pid" 2>/dev/null
}
trap on_term TERM

# setsid: srun in its own process group, out of reach of a TERM sent to this shell's group (see above). No job
# control here, so the background child is no group leader and setsid execs srun without forking: $! is srun.
setsid srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash "$REPO/launch/torchrun.sh" train.resume=auto "$@" &
srun_pid=$!
rc=0
while :; do
    wait "$srun_pid"
    rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break # wait also returns when a trapped signal arrives: keep waiting
done

status="$(cat "$DTUNE_STATUS_FILE" 2>/dev/null || true)"
echo "dtune: srun exited $rc; dtune reported: ${status:-nothing}"
if [[ "$status" == *'"status": "done"'* ]]; then
    exit 0
fi
if [[ "$status" == *'"status": "preempted"'* || -n "$warned" ]]; then
    # A checkpointed stop, or a warned job that could not report one: go on from the newest checkpoint.
    echo "dtune: requeueing job $SLURM_JOB_ID; it resumes from its newest checkpoint"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "dtune: scontrol requeue failed; the job ends with 75 so that it is not taken for finished" >&2
    exit 75
fi
exit "$rc"
