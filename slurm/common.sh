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
# arguments for `mpibelief train` after the config) and MB_SETS (the TABLE.KEY=VALUE
# of every --set, for the checks that must see the same config as the run).
mb_parse_train_args() {
    [[ $# -ge 1 ]] || mb_die "no config given: sbatch slurm/train.sbatch CONFIG [--set TABLE.KEY=VALUE]..."
    MB_CONFIG=$1
    shift
    [[ -f $MB_CONFIG ]] || mb_die "config $MB_CONFIG not found (relative paths start at the submit directory $PWD)"
    # shellcheck disable=SC2034  # read by the scripts that source this file
    MB_TRAIN_ARGS=("$@")
    MB_SETS=()
    while [[ $# -gt 0 ]]; do
        case $1 in
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
    # The push path's NaN probe is compiled by clients only, which the run above lacks.
    "$PYTHON" -c 'import numpy as np; from mpibelief.client import all_finite
all_finite(np.zeros(1, np.float32))'
    rm -rf "$tmp"
    mb_log "data and Numba cache warm ($((SECONDS - start)) s, one process)"
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

# mb_on_signals: what the batch shell does with USR1, from its first line on (without
# a trap, USR1 ends bash). Submitted with --signal=B:USR1@SECONDS, a job gets USR1 that
# long before its time limit.
#
# RESUME PLUGS IN HERE (issue 11, item 3): forward USR1 to the running step
# (kill -USR1 "$MB_STEP"; srun passes it on to every rank) so the run writes a
# checkpoint, then `scontrol requeue "$SLURM_JOB_ID"`; mb_resume_args adds the resume
# option when the requeued job starts again. Until runs can checkpoint, USR1 is only
# logged: forwarding it would kill ranks that have no handler for it.
mb_on_signals() {
    trap 'mb_log "USR1: time limit near; this run cannot checkpoint yet, it runs on"' USR1
}

# mb_run N ARGS...: run `python ARGS` on N ranks and return its exit status.
#
# The step runs in the background so that the shell can take signals while it runs
# (bash runs a trap only between foreground commands).
mb_run() {
    mb_launcher "$1"
    shift
    mb_log "launch: ${MB_LAUNCH[*]} $PYTHON $*"
    "${MB_LAUNCH[@]}" "$PYTHON" "$@" &
    MB_STEP=$!
    local rc
    while :; do
        wait "$MB_STEP" && rc=0 || rc=$?
        kill -0 "$MB_STEP" 2>/dev/null || break  # wait was cut short by a signal
    done
    return "$rc"
}

# mb_resume_args: sets MB_RESUME, the arguments for a job that Slurm has requeued
# (SLURM_RESTART_COUNT > 0). RESUME PLUGS IN HERE: set it to the option that resumes
# from this run's checkpoint. Until then a requeued job (sbatch --requeue) starts
# over, and says so.
mb_resume_args() {
    # shellcheck disable=SC2034  # read by the scripts that source this file
    MB_RESUME=()
    if [[ ${SLURM_RESTART_COUNT:-0} -gt 0 ]]; then
        mb_log "restart $SLURM_RESTART_COUNT of job $SLURM_JOB_ID: no checkpoints yet, starting over"
    fi
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
