#!/bin/bash
# distcifar on Slurm: 1..N nodes, GPU or CPU-only partitions, checkpoint + requeue on preemption.
#
# Submit from the project root (the log path logs/ and distcifar/train.py are relative to it):
#   sbatch slurm/train.sh [ARGS FOR train.py]            e.g. --data.path /data/cifar10 --train.epochs 3
#   sbatch --nodes=2 --gpus-per-node=4 --time=04:00:00 slurm/train.sh ...
#   CONFIG=configs/smoke.yaml OUTPUT_DIR=runs/smoke sbatch slurm/train.sh ...
#   SWEEP=optim.lr=0.1,0.2,0.4 sbatch --array=0-2 slurm/train.sh ...   # one run per value
#
# Resources: any #SBATCH line below can be overridden on the sbatch command line.
# One srun task per node runs `accelerate launch` (or plain python for a single process)
# with PROCS_PER_NODE processes (default: GPUs on the node, else 1 CPU process).
#
# Environment variables (all optional; sbatch passes your environment to the job):
#   CONFIG          training config               (default configs/default.yaml)
#   OUTPUT_DIR      run folder: checkpoints, final model, metrics (default runs/<job name>);
#                   train.py resumes from its newest checkpoint automatically. Array task N
#                   uses OUTPUT_DIR/N (default runs/<job name>-<array job id>/N)
#   SWEEP           KEY=V0,V1,... for an array job: task N adds --KEY VN to train.py's arguments
#                   (e.g. SWEEP=optim.lr=0.1,0.2,0.4 with --array=0-2; values without commas)
#   PYTHON          python interpreter to use     (default $VENV/bin/python, else ./.venv/bin/python,
#   VENV            virtual environment folder     else python3 on PATH)
#   PROCS_PER_NODE  processes per node            (default: SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES,
#                                                  nvidia-smi -L; 1 without GPUs)
#   MAX_RESTARTS    restarts of the job: self-requeues after SIGUSR1 and restarts of a failed step
#                   within the allocation, together with Slurm's requeues (SLURM_RESTART_COUNT) (default 10;
#                   an array task requeues only itself: scontrol requeue <array job id>_<task id>)
#   MAIN_ADDR       address of the first node      (default: its NodeAddr from scontrol)
#   MAIN_PORT       rendezvous port                (default 20000 + job id % 10000; + 1 for each restart of
#                                                  a failed step within the allocation)
#   SRUN_WAIT       seconds to wait for the other nodes once one node's task has ended, then
#                   kill them (a failed node must not leave the others hanging) (default 300)
#   PROJECT_DIR     project root                   (default: the job's working directory, i.e.
#                                                  where sbatch ran, or --chdir)
#
# Time limit: Slurm sends SIGUSR1 to this batch shell 300 s before the time limit
# (--signal=B:USR1@300); `scancel --signal=USR1 --full JOBID` does the same by hand.
# The batch shell passes it on to every node; there the SIGUSR1 reaches the workers
# and each node's wrapper sends SIGTERM to its launcher, which passes it to its workers
# (torchrun gives them 30 s). train.py saves a checkpoint at the next step boundary and exits;
# the job then requeues itself (scontrol requeue, same job id, same log file) and resumes.
# Preemption, scancel and the time limit itself send SIGTERM (then SIGKILL after the cluster's
# KillWait, or GraceTime for preemption) to every process of the job: train.py checkpoints at
# the next step boundary. Under PreemptMode=REQUEUE (or `scontrol requeue JOBID`) Slurm then
# requeues the job itself and the next start resumes; after scancel, PreemptMode=CANCEL or the
# time limit the job ends, and a resubmission with the same OUTPUT_DIR resumes.
#
# A worker that dies (OOM kill, segfault, a node's task lost) or stops answering fails the step: it is started
# again in the same allocation and resumes from the newest checkpoint, up to MAX_RESTARTS (never after a usage
# error); a lost allocation (NODE_FAIL) is requeued by Slurm (--requeue).
#
# Exit code (sacct's and scontrol's ExitCode): train.py's own, also through accelerate launch
# (which reports 1 for any failure): 2 for a usage error, 1 for a failed run.
#
#SBATCH --job-name=distcifar
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue

set -u

log() { echo "[train.sh $(date +%H:%M:%S)] $*"; }
fail() { echo "[train.sh] ERROR: $*" >&2; exit 2; }

# Signals to this batch shell. SIGUSR1 (--signal=B:USR1@..., or scancel --signal=USR1):
# stop with a checkpoint, then requeue. SIGTERM/SIGINT (scancel, time limit, preemption, a
# requeue by Slurm): stop; Slurm decides whether the job comes back.
REQUEUE=0
STOPPED=0
SRUN_PID=
on_usr1() {
    if [ "$REQUEUE" = 0 ]; then
        REQUEUE=1
        log "SIGUSR1: telling training to checkpoint and stop; the job will be requeued"
        [ -n "$SRUN_PID" ] && kill -USR1 "$SRUN_PID" 2>/dev/null
    fi
}
on_term() { STOPPED=1; log "SIGTERM/SIGINT: training checkpoints and stops"; }
trap on_usr1 USR1
trap on_term TERM INT

[ -n "${SLURM_JOB_ID:-}" ] || fail "submit with sbatch: sbatch slurm/train.sh [ARGS]"

PROJECT_DIR=${PROJECT_DIR:-$PWD}  # the job starts in the submit dir (or --chdir)
cd "$PROJECT_DIR" || fail "cannot cd to $PROJECT_DIR"
[ -f distcifar/train.py ] || fail "no distcifar/train.py in $PROJECT_DIR: submit from the project root"

CONFIG=${CONFIG:-configs/default.yaml}
JOB=$SLURM_JOB_ID  # what a requeue targets: an array's job id would requeue every task of it
SWEEP_ARGS=()
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    JOB=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
    OUTPUT_DIR=${OUTPUT_DIR:-runs/${SLURM_JOB_NAME:-distcifar}-$SLURM_ARRAY_JOB_ID}/$SLURM_ARRAY_TASK_ID
    if [ -n "${SWEEP:-}" ]; then
        IFS=, read -r -a SWEEP_VALUES <<<"${SWEEP#*=}"
        [ "${SWEEP%%=*}" != "$SWEEP" ] && [ "${#SWEEP_VALUES[@]}" -gt 0 ] \
            || fail "SWEEP must be KEY=V0,V1,... (e.g. optim.lr=0.1,0.2), not '$SWEEP'"
        [ "$SLURM_ARRAY_TASK_ID" -lt "${#SWEEP_VALUES[@]}" ] \
            || fail "array task $SLURM_ARRAY_TASK_ID has no value in SWEEP=$SWEEP: use --array=0-$(( ${#SWEEP_VALUES[@]} - 1 ))"
        SWEEP_KEY=${SWEEP%%=*}
        SWEEP_ARGS=("--${SWEEP_KEY#--}" "${SWEEP_VALUES[$SLURM_ARRAY_TASK_ID]}")
    fi
else
    [ -z "${SWEEP:-}" ] || fail "SWEEP=$SWEEP needs an array job: sbatch --array=0-N slurm/train.sh ..."
    OUTPUT_DIR=${OUTPUT_DIR:-runs/${SLURM_JOB_NAME:-distcifar}}
fi
MAX_RESTARTS=${MAX_RESTARTS:-10}
SRUN_WAIT=${SRUN_WAIT:-300}
RESTART=${SLURM_RESTART_COUNT:-0}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}

if [ -z "${PYTHON:-}" ]; then
    if [ -n "${VENV:-}" ]; then PYTHON=$VENV/bin/python
    elif [ -x .venv/bin/python ]; then PYTHON=$PWD/.venv/bin/python
    else PYTHON=$(command -v python3 || command -v python || true)
    fi
fi
[ -n "$PYTHON" ] && [ -x "$PYTHON" ] || fail "python not found (PYTHON=${PYTHON:-}); set VENV= or PYTHON="

# processes per node: explicit, else GPUs allocated/visible, else one CPU process
if [ -z "${PROCS_PER_NODE:-}" ]; then
    PROCS_PER_NODE=0
    if [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ] 2>/dev/null; then
        PROCS_PER_NODE=$SLURM_GPUS_ON_NODE
    elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$CUDA_VISIBLE_DEVICES" != "-1" ]; then
        PROCS_PER_NODE=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
    elif command -v nvidia-smi >/dev/null 2>&1; then
        PROCS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    [ "${PROCS_PER_NODE:-0}" -gt 0 ] 2>/dev/null || PROCS_PER_NODE=1
fi
NPROCS=$(( NNODES * PROCS_PER_NODE ))

FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
if [ -z "${MAIN_ADDR:-}" ]; then
    # node names need not resolve (e.g. the emulated test cluster): use the node's NodeAddr
    MAIN_ADDR=$(scontrol show node -o "$FIRST_NODE" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    MAIN_ADDR=${MAIN_ADDR:-$FIRST_NODE}
fi
MAIN_PORT=${MAIN_PORT:-$(( 20000 + SLURM_JOB_ID % 10000 ))}

TRAIN_ARGS=(distcifar/train.py --config "$CONFIG" --output_dir "$OUTPUT_DIR" "$@" "${SWEEP_ARGS[@]}")
# The launch command of an attempt; $1 is its rendezvous port (each in-allocation restart takes the next one,
# so that no restart waits for the dead launcher's port to be free again).
launch_cmd() {
    if [ "$NPROCS" -gt 1 ]; then
        # --multi_gpu is also right without CUDA: train.py then runs a gloo MULTI_CPU job.
        # --machine_rank "$SLURM_NODEID" is added on each node by NODE_SCRIPT.
        CMD=(multi "$PYTHON" -m accelerate.commands.launch --multi_gpu
             --num_machines "$NNODES" --num_processes "$NPROCS"
             --main_process_ip "$MAIN_ADDR" --main_process_port "$1"
             --mixed_precision no --dynamo_backend no "${TRAIN_ARGS[@]}")
    else
        CMD=(single "$PYTHON" "${TRAIN_ARGS[@]}")
    fi
}

log "job $JOB restart $RESTART/$MAX_RESTARTS: $NNODES node(s) [$SLURM_JOB_NODELIST] x $PROCS_PER_NODE proc(s), main $MAIN_ADDR:$MAIN_PORT, output $OUTPUT_DIR"
log "train.py args: ${TRAIN_ARGS[*]:1}"

# Runs once per node (srun task). Single quotes: $SLURM_NODEID etc. are read on each node.
# The launcher is started with SIGUSR1 ignored (inherited), because torchrun/accelerate
# would die on it and orphan the workers; train.py installs its own SIGUSR1 handler.
# On SIGUSR1 the wrapper sends SIGTERM (once) to its launcher, which forwards it to the
# workers. SIGTERM/SIGINT reach the launcher and workers straight from Slurm, so the
# wrapper only keeps waiting then.
# shellcheck disable=SC2016
NODE_SCRIPT='
mode=$1; shift
node=${SLURM_NODEID:-0}
# the CPUs this task may run on (its affinity), at most what the job holds on the node
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
if [ -n "${SLURM_CPUS_ON_NODE:-}" ] && [ "$SLURM_CPUS_ON_NODE" -lt "$cpus" ]; then cpus=$SLURM_CPUS_ON_NODE; fi
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    export OMP_NUM_THREADS=$(( cpus / ${PROCS_PER_NODE:-1} > 0 ? cpus / ${PROCS_PER_NODE:-1} : 1 ))
fi
# multi: $1 $2 $3 = python -m accelerate.commands.launch; each node adds its own rank
[ "$mode" = multi ] && set -- "$1" "$2" "$3" --machine_rank "$node" "${@:4}"
echo "[train.sh node $node/$NNODES] ${SLURMD_NODENAME:-$(hostname)}: machine rank $node, $PROCS_PER_NODE process(es), $mode launch, $cpus CPU(s)"
relayed=0
on_usr1() {
    if [ "$relayed" = 0 ]; then
        relayed=1
        echo "[train.sh node $node] SIGUSR1: sending SIGTERM to pid $child"
        kill -TERM "$child" 2>/dev/null
    fi
}
trap on_usr1 USR1
trap "echo \"[train.sh node $node] SIGTERM/SIGINT: waiting for training to stop\"" TERM INT
( trap "" USR1; exec "$@" ) &
child=$!
while :; do
    wait "$child"; rc=$?
    if [ "$rc" -gt 128 ] && kill -0 "$child" 2>/dev/null; then continue; fi
    if [ "$rc" -gt 128 ]; then wait "$child" 2>/dev/null; r2=$?; [ "$r2" != 127 ] && rc=$r2; fi
    break
done
[ "$rc" = 0 ] || echo "[train.sh node $node] training exited with code $rc"
exit "$rc"
'

# train.py's main process writes its exit code here (accelerate launch would report 1 for a
# usage error's 2). It runs on node 0, which is this batch host.
DISTCIFAR_EXIT_CODE_FILE=$(mktemp "${TMPDIR:-/tmp}/distcifar-exit.XXXXXX") || fail "mktemp failed"
trap 'rm -f "$DISTCIFAR_EXIT_CODE_FILE"' EXIT
export PROCS_PER_NODE NNODES DISTCIFAR_EXIT_CODE_FILE
LABEL=()
[ "$NNODES" -gt 1 ] && LABEL=(--label)
# Slurm 22.05-23.02: srun does not inherit sbatch's --cpus-per-task; without it each node's task
# may be bound to one CPU
SRUN_CPUS=()
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && SRUN_CPUS=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
# One srun step per attempt. A step that fails while nobody asked the job to stop (a worker killed: OOM, a
# segfault, a node's task lost; a rank stuck past train.collective_timeout_s) is started again in this
# allocation, and train.py resumes from the newest checkpoint. Not after a usage error (exit code 2: it would
# fail again), a stop signal, or once the job has used MAX_RESTARTS restarts (Slurm requeues included). Where
# the allocation itself is lost (NODE_FAIL), Slurm requeues the job (--requeue) and the next start resumes.
IN_JOB_RESTARTS=0
run_step() {
    launch_cmd $(( MAIN_PORT + IN_JOB_RESTARTS ))
    : >"$DISTCIFAR_EXIT_CODE_FILE"
    srun --nodes="$NNODES" --ntasks-per-node=1 "${SRUN_CPUS[@]}" --kill-on-bad-exit=0 --wait="$SRUN_WAIT" "${LABEL[@]}" \
        bash -c "$NODE_SCRIPT" train-node "${CMD[@]}" &
    SRUN_PID=$!
    while :; do
        wait "$SRUN_PID"; RC=$?
        # a trapped signal interrupts wait: keep waiting while srun runs
        if [ "$RC" -gt 128 ] && kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi
        if [ "$RC" -gt 128 ]; then wait "$SRUN_PID" 2>/dev/null; R2=$?; [ "$R2" != 127 ] && RC=$R2; fi
        break
    done
    if [ "$RC" != 0 ] && [ -s "$DISTCIFAR_EXIT_CODE_FILE" ]; then
        RC=$(head -n1 "$DISTCIFAR_EXIT_CODE_FILE")
    fi
}
if [ "$REQUEUE" = 1 ]; then
    RC=143  # SIGUSR1 before training started: just requeue
else
    while run_step; [ "$RC" != 0 ] && [ "$RC" != 2 ] && [ "$STOPPED" = 0 ] && [ "$REQUEUE" = 0 ]; do
        USED=$(( RESTART + IN_JOB_RESTARTS ))
        if [ "$USED" -ge "$MAX_RESTARTS" ]; then
            log "training failed with exit code $RC; restart limit MAX_RESTARTS=$MAX_RESTARTS reached (restarts used: $USED): not restarting"
            break
        fi
        IN_JOB_RESTARTS=$(( IN_JOB_RESTARTS + 1 ))
        log "training failed with exit code $RC (a worker died or stopped answering): restarting it in this allocation from the newest checkpoint in $OUTPUT_DIR (restart $(( USED + 1 ))/$MAX_RESTARTS, $(( MAX_RESTARTS - USED - 1 )) left)"
    done
fi

# Slurm's own requeue (PreemptMode=REQUEUE, scontrol requeue) counts the restart before this
# attempt ends
requeued_by_slurm() {
    local n
    n=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'Restarts=[0-9]*' | cut -d= -f2)
    [ -n "$n" ] && [ "$n" -gt "$RESTART" ]
}

if [ "$RC" = 0 ]; then
    log "training finished (output in $OUTPUT_DIR)"
    exit 0
fi
if [ "$STOPPED" = 1 ] && requeued_by_slurm; then
    log "training stopped (exit code $RC); Slurm is requeueing job $JOB: its next start resumes from $OUTPUT_DIR"
elif [ "$REQUEUE" = 1 ]; then
    if [ $(( RESTART + IN_JOB_RESTARTS )) -lt "$MAX_RESTARTS" ]; then  # in-job restarts count too
        log "training stopped (exit code $RC) after SIGUSR1: requeueing job $JOB (restart $((RESTART + 1))/$MAX_RESTARTS)"
        if scontrol requeue "$JOB"; then
            exit 0
        fi
        log "ERROR: scontrol requeue failed; resubmit by hand to resume from $OUTPUT_DIR"
    else
        log "training stopped (exit code $RC); restart limit MAX_RESTARTS=$MAX_RESTARTS reached: not requeueing"
    fi
elif [ "$STOPPED" = 1 ]; then
    log "training stopped after SIGTERM (exit code $RC); not requeued. Resubmit to resume with OUTPUT_DIR=$OUTPUT_DIR"
elif [ "$RC" = 2 ]; then
    log "training failed with exit code 2, a usage error: fix the command (see the error above); not restarted"
else
    log "training failed with exit code $RC; not restarted. Resubmit to resume with OUTPUT_DIR=$OUTPUT_DIR"
fi
exit "$RC"
