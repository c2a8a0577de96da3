# shellcheck shell=bash
# Shared by slurm/*.sbatch and slurm/campaign.sh; sourced, never run.
#
# Everything a site may need to change is a variable, read here once:
#   MPIBELIEF_PYTHON    the interpreter with mpibelief installed  (python3 on PATH)
#   MPIBELIEF_LAUNCHER  srun | mpiexec: who starts the ranks        (srun)
#   MPIBELIEF_SRUN_MPI  srun's --mpi plugin                          (pmi2)
#   MPIBELIEF_MPIEXEC   the mpiexec to use with MPIBELIEF_LAUNCHER=mpiexec (mpiexec)
# Partition and account are Slurm's own input variables, SBATCH_PARTITION and
# SBATCH_ACCOUNT (or -p/-A on the sbatch line): no script here names either.
#
# pmi2 is the default because it is the PMI that both MPICH (the `mpich` wheel, tested
# here with srun --mpi=pmi2) and site MPIs built with Slurm support speak; Open MPI
# builds for PMIx want MPIBELIEF_SRUN_MPI=pmix.

PYTHON=${MPIBELIEF_PYTHON:-python3}
LAUNCHER=${MPIBELIEF_LAUNCHER:-srun}
SRUN_MPI=${MPIBELIEF_SRUN_MPI:-pmi2}
MPIEXEC=${MPIBELIEF_MPIEXEC:-mpiexec}
# The checkout that holds this file: sbatch runs a copy of the job script from its
# spool folder, so the scripts find it through the submit directory instead.
MB_SLURM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

mb_die() {
    echo "mpibelief: error: $*" >&2
    exit 2
}

mb_log() {
    echo "mpibelief slurm: $*"
}

# mb_parse_train_args CONFIG [TRAIN_ARGS...]: sets MB_CONFIG, MB_TRAIN_ARGS (all
# arguments for `mpibelief train` after the config), MB_SETS (the TABLE.KEY=VALUE of
# every --set, for the checks that must see the same config as the run) and MB_OUT
# (the last --out, or empty: the run's result file is then the config's).
mb_parse_train_args() {
    [[ $# -ge 1 ]] || mb_die "no config given: sbatch slurm/train.sbatch CONFIG [--set TABLE.KEY=VALUE]..."
    MB_CONFIG=$1
    shift
    [[ -f $MB_CONFIG ]] || mb_die "config $MB_CONFIG not found (relative paths start at the submit directory $PWD)"
    # shellcheck disable=SC2034  # read by the scripts that source this file
    MB_TRAIN_ARGS=("$@")
    MB_SETS=() MB_OUT=""
    while [[ $# -gt 0 ]]; do
        case $1 in
            --out)
                [[ $# -ge 2 ]] || mb_die "--out needs a file"
                MB_OUT=$2
                shift 2
                ;;
            --out=*)
                MB_OUT=${1#--out=}
                shift
                ;;
            --set)
                [[ $# -ge 2 ]] || mb_die "--set needs TABLE.KEY=VALUE"
                MB_SETS+=("$2")
                shift 2
                ;;
            --set=*)
                MB_SETS+=("${1#--set=}")
                shift
                ;;
            *) shift ;;
        esac
    done
}

# One Numba/BLAS thread per CPU Slurm gave each task: more would oversubscribe the
# node, fewer would leave paid-for cores idle. Exported before any Python starts.
mb_threads() {
    MB_THREADS=${SLURM_CPUS_PER_TASK:-1}
    export NUMBA_NUM_THREADS=$MB_THREADS OPENBLAS_NUM_THREADS=$MB_THREADS
    export OMP_NUM_THREADS=$MB_THREADS MKL_NUM_THREADS=$MB_THREADS
}

# mb_world NP CONFIG [K=V...]: the world size the config needs, or a one-line error.
mb_world() {
    local np=$1
    shift
    "$PYTHON" "$MB_SLURM_DIR/world.py" --np "$np" "$@" || exit 2
}

# mb_warm CONFIG [K=V...]: build the data cache and compile the Numba kernels in one
# process, so that N ranks starting together read a warm cache instead of each
# extracting features and compiling the same kernels at once (on a shared file system
# that is N times the work, and concurrent writers of one cache index is asking for
# trouble). A tiny single-replica run on synthetic data with the config's model and
# optimizer compiles what training calls; the kernel signatures do not depend on sizes.
mb_warm() {
    local config=$1 start=$SECONDS
    shift
    local sets=("${@/#/--set=}") tmp
    tmp=$(mktemp -d)
    "$PYTHON" -m mpibelief data "$config" "${sets[@]}" || exit 2
    "$PYTHON" -m mpibelief train "$config" "${sets[@]}" \
        --set run.algorithm=sgd --set layout.shards=0 --set layout.replicas=1 \
        --set layout.partitions=1 --set data.source=synthetic --set data.n_train=64 \
        --set data.n_test=32 --set data.n_inputs=8 --set data.n_classes=4 \
        --set model.hidden=8 --set train.batch=16 --set train.epochs=1.0 \
        --set train.max_seconds=0.0 --set train.eval_samples=0 \
        --out "$tmp/warm.h5" >"$tmp/warm.log" 2>&1 || {
        cat "$tmp/warm.log" >&2
        rm -rf "$tmp"
        mb_die "warming the Numba cache failed (output above)"
    }
    # The shards' update rules and the push path's NaN probe, which SGD alone lacks, and
    # the compression codec (compressed runs, real or simulated).
    "$PYTHON" -c 'from mpibelief.compressor import Compressor
from mpibelief.optim import Optimizer
for kind in ("sgd", "adagrad"): Optimizer(kind, 0.1).warm()
Compressor.warm()'
    rm -rf "$tmp"
    mb_log "data and Numba cache warm ($((SECONDS - start)) s, one process)"
}

# mb_figure_out DEFAULT [BENCH_OPTIONS...]: sets MB_FIG_OUT, the result file a figure
# campaign's bench writes (its --out, else DEFAULT), and stops the job before any work
# when that file exists and the options do not say --overwrite: a campaign never
# replaces a result silently (the file of Figure N may be the one in the repository).
mb_figure_out() {
    local overwrite=0
    MB_FIG_OUT=$1
    shift
    while [[ $# -gt 0 ]]; do
        case $1 in
            --out)
                [[ $# -ge 2 ]] || mb_die "--out needs a file"
                MB_FIG_OUT=$2
                shift
                ;;
            --out=*) MB_FIG_OUT=${1#--out=} ;;
            --overwrite) overwrite=1 ;;
        esac
        shift
    done
    if [[ -e $MB_FIG_OUT && $overwrite -eq 0 ]]; then
        mb_die "$MB_FIG_OUT exists: pass --overwrite to replace it"
    fi
}

# mb_launcher N: sets MB_LAUNCH, the command prefix that starts N ranks.
mb_launcher() {
    case $LAUNCHER in
        # srun in 22.05 does not inherit the job's --cpus-per-task: say it again.
        srun) MB_LAUNCH=(srun --mpi="$SRUN_MPI" --ntasks="$1" --cpus-per-task="$MB_THREADS"
            --kill-on-bad-exit=1) ;;
        mpiexec) MB_LAUNCH=("$MPIEXEC" -n "$1") ;;
        *) mb_die "MPIBELIEF_LAUNCHER=$LAUNCHER: use srun or mpiexec" ;;
    esac
}

# mb_probe N: start N ranks that only check they form one MPI world of N. A launcher
# and an MPI that do not share a PMI start N singleton worlds of 1 rank each, and
# every rank of the real run would then fail on its own; this says why, once.
mb_probe() {
    mb_launcher "$1"
    "${MB_LAUNCH[@]}" "$PYTHON" -c '
import os, sys
from mpi4py import MPI
size, want = MPI.COMM_WORLD.size, int(sys.argv[1])
first = os.environ.get("SLURM_PROCID", os.environ.get("PMI_RANK", "0")) == "0"
if size != want and first:
    print(f"mpibelief: error: {sys.argv[2]} started MPI worlds of {size} rank(s), not one"
          f" of {want}: its PMI and this mpi4py'"'"'s MPI disagree (set MPIBELIEF_SRUN_MPI,"
          " or MPIBELIEF_LAUNCHER=mpiexec)", file=sys.stderr, flush=True)
# Only the first task fails: were all to fail, --kill-on-bad-exit could end it first.
sys.exit(size != want and first)' "$1" "${MB_LAUNCH[*]}" || exit 2
}

# Signals, time limits and requeue. The choice: --signal goes to the batch shell
# (B:USR1@SECONDS, set in every training script), never straight to the steps, because
# only the batch shell can requeue the job, and Slurm does not requeue a job that hits
# its time limit. The shell answers USR1 by having every rank sent SIGTERM (below):
# each run writes a checkpoint and stops cleanly, exit code 143. The shell then runs
# `scontrol requeue`; the job starts again from the top of its script with
# SLURM_RESTART_COUNT=1, 2, ..., and mb_resume_args passes --resume. USR1 is not passed
# on as USR1 ("checkpoint and go on"): the job would still be killed at its limit, and
# never requeued.
#
# How SIGTERM reaches the ranks differs by launcher (mb_stop_step): srun forwards most
# signals to its tasks, but its own SIGTERM it turns into SIGKILL ("srun: forcing job
# termination"), so the shell asks Slurm to signal the job's steps instead (scancel
# --signal=TERM, which leaves the batch shell and srun alone); Hydra's mpiexec forwards
# SIGTERM to every rank, so the shell sends it to mpiexec.
#
# SIGTERM to the whole job (scancel, the time limit itself, preemption, `scontrol
# requeue` by an operator) reaches every process of the job from Slurm at once. The
# shell forwards it too (a repeat is harmless) and waits for the step, within Slurm's
# KillWait, so the ranks can write their checkpoint and stop; a job that Slurm or an
# operator requeues then resumes by itself. Seen here with both launchers, but with srun
# it is a race: srun answers its own SIGTERM with "forcing job termination", and a run
# that loses it resumes from its last periodic checkpoint (checkpoint.every). For a
# planned requeue, checkpoint first: `scancel --signal=USR1 JOB` reaches the ranks (the
# steps, not the batch shell), which write one and go on; then `scontrol requeue JOB`.
MB_STEP="" MB_STOP="" MB_REQUEUE=0
# Self-requeues allowed per job, so that a run that cannot make progress (a --signal
# lead longer than the time limit) does not requeue forever.
MAX_REQUEUES=${MPIBELIEF_MAX_REQUEUES:-20}

# mb_on_signals: install the traps, from the script's first lines on (without a trap,
# USR1 ends bash).
mb_on_signals() {
    trap 'mb_stop USR1' USR1
    trap 'mb_stop TERM' TERM
}

# mb_stop USR1|TERM: ask the running step to checkpoint and stop; USR1 also asks for a
# requeue once it has. Before any step runs, TERM ends the script and USR1 is kept
# for mb_run, which then launches nothing.
mb_stop() {
    MB_STOP=$1
    local why="the job is ending"
    if [[ $1 == USR1 ]]; then
        MB_REQUEUE=1
        why="time limit near"
    fi
    if [[ -n $MB_STEP ]] && kill -0 "$MB_STEP" 2>/dev/null; then
        mb_log "$1 ($why): SIGTERM to every rank, each checkpoints and stops"
        mb_stop_step
    elif [[ $1 == TERM ]]; then
        mb_log "TERM ($why) while no run is going: stopping"
        exit 143
    fi
}

# mb_job: this job as scontrol and scancel name it. An array task's SLURM_JOB_ID may
# equal its SLURM_ARRAY_JOB_ID, which names the whole array: use ARRAY_TASK instead.
mb_job() {
    if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
        echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    else
        echo "$SLURM_JOB_ID"
    fi
}

# mb_stop_step: SIGTERM to every rank of the running step (see the top of this part).
mb_stop_step() {
    case $LAUNCHER in
        srun) scancel --signal=TERM "$(mb_job)" || true ;;
        *) kill -TERM "$MB_STEP" 2>/dev/null || true ;;
    esac
}

# mb_requeue RC: after a step stopped on USR1, put the job back in the queue (it
# resumes from the checkpoint just written) and end the script.
mb_requeue() {
    local rc=$1 restarts=${SLURM_RESTART_COUNT:-0}
    if [[ $restarts -ge $MAX_REQUEUES ]]; then
        mb_log "not requeued: restarted $restarts times already (MPIBELIEF_MAX_REQUEUES=$MAX_REQUEUES)"
    else
        # The requeue ends this attempt at once (SIGTERM to this shell): say it first.
        mb_log "requeueing job $(mb_job) (restart $((restarts + 1))): it resumes from its checkpoint"
        trap 'exit "$rc"' TERM
        scontrol requeue "$(mb_job)" || mb_log "scontrol refused the requeue (submitted with" \
            "--no-requeue?): resubmit the same command with --resume to continue"
    fi
    exit "$rc"
}

# mb_run N ARGS...: run `python ARGS` on N ranks and return its exit status; a step
# stopped for a requeue (USR1) does not return: mb_requeue ends the script.
#
# The step runs in the background so that the shell can take signals while it runs
# (bash runs a trap only between foreground commands).
mb_run() {
    mb_launcher "$1"
    shift
    local rc
    if [[ -n $MB_STOP ]]; then
        mb_log "$MB_STOP came before the launch: not starting the run"
        rc=143
    else
        mb_log "launch: ${MB_LAUNCH[*]} $PYTHON $*"
        "${MB_LAUNCH[@]}" "$PYTHON" "$@" &
        MB_STEP=$!
        while :; do
            wait "$MB_STEP" && rc=0 || rc=$?
            kill -0 "$MB_STEP" 2>/dev/null || break  # wait was cut short by a signal
        done
        MB_STEP=""
    fi
    # A run that completed before the signal reached it has nothing left to resume.
    if [[ $MB_REQUEUE -eq 1 && $rc -ne 0 ]]; then
        mb_requeue "$rc"
    fi
    return "$rc"
}

# mb_resume_args: sets MB_RESUME, the arguments that make a requeued job
# (SLURM_RESTART_COUNT > 0) continue its run, and MB_DONE=1 when the run had already
# completed. A first attempt gets none: an existing result file is then someone's
# earlier run, and the run refuses it unless the submit line says --resume or
# --overwrite. slurm/resume.py decides from the result file and its checkpoints.
# shellcheck disable=SC2034  # MB_RESUME and MB_DONE are read by the scripts
mb_resume_args() {
    MB_RESUME=() MB_DONE=0
    [[ ${SLURM_RESTART_COUNT:-0} -gt 0 ]] || return 0
    local decision action why out_arg=()
    [[ -n $MB_OUT ]] && out_arg=(--out "$MB_OUT")
    decision=$("$PYTHON" "$MB_SLURM_DIR/resume.py" --job "$SLURM_JOB_ID" "${out_arg[@]}" \
        "$MB_CONFIG" "${MB_SETS[@]}") || exit 2
    IFS=$'\t' read -r action why <<<"$decision"
    mb_log "restart $SLURM_RESTART_COUNT of job $SLURM_JOB_ID: $why"
    case $action in
        resume) MB_RESUME=(--resume) ;;
        overwrite) MB_RESUME=(--overwrite) ;;
        done) MB_DONE=1 ;;
    esac
}

# mb_job_header: what runs where, at the top of every job's output file.
mb_job_header() {
    local how=$LAUNCHER array=""
    [[ $LAUNCHER == srun ]] && how="srun --mpi=$SRUN_MPI"
    [[ -n ${SLURM_ARRAY_TASK_ID:-} ]] && array=" (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})"
    mb_log "job ${SLURM_JOB_ID:-?}$array: ${SLURM_NTASKS:-?} task(s) x ${MB_THREADS} CPU(s)" \
        "on ${SLURM_JOB_NODELIST:-?}; launcher: $how; $("$PYTHON" --version 2>&1)"
}

# mb_sweep_out DIR CONFIG KEY VALUE: the result file of one sweep point. One rule for
# the sweep that writes it and the campaign driver that plots it.
mb_sweep_out() {
    local stem=${2##*/} tag="$3-$4"
    stem=${stem%.toml}
    echo "$1/$stem-${tag//[^A-Za-z0-9._-]/_}.h5"
}
