#!/usr/bin/env bash
# A campaign: submit training jobs, then one plot job that waits for all of them.
#
#   slurm/campaign.sh [-n NAME] [-s KEY=V1,V2,...] [-o SBATCH_OPTION]... [-d] \
#       CONFIG[@NTASKS]... [-- TRAIN_OPTIONS...]
#
#   slurm/campaign.sh -n fig4 configs/sgd.toml configs/demo.toml@5 configs/demo.toml@9
#   slurm/campaign.sh -n lr -s train.lr=0.003,0.01,0.03 configs/demo.toml@5
#   slurm/campaign.sh -n reps -s layout.replicas=1,2,4 configs/demo.toml -- --set train.epochs=2
#
# Without -s, every CONFIG is one train.sbatch job with exactly the tasks it needs
# (NTASKS when given; a config with layout.replicas = 0 fills the world and needs it).
# With -s, every CONFIG is one sweep.sbatch job array, a task per value, each asking for
# the largest world among the values. Results go to results/NAME/ (which must not hold
# results already: nothing is silently replaced), and the plot job, submitted with
# --dependency=afterok on every training job, draws results/NAME/accuracy.png from
# exactly their result files. The job ids are printed, one line per job.
#
#   -n NAME        campaign name (default: campaign-YYYYmmdd-HHMMSS)
#   -s KEY=VALUES  sweep KEY over the comma-separated VALUES (a job array per config)
#   -o OPTION      pass OPTION to the sbatch of every training job (repeatable), e.g.
#                  -o --time=04:00:00 -o --signal=B:USR1@600 (the scripts already
#                  ask for --signal=B:USR1@300 and --requeue: see slurm/train.sbatch)
#   -d             dry run: print the sbatch commands, submit nothing
# Partition and account: SBATCH_PARTITION and SBATCH_ACCOUNT, which sbatch reads itself.
# Launcher and PMI variables (slurm/common.sh) reach the jobs through sbatch's environment.

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# The jobs find slurm/common.sh here, wherever the campaign is started from.
MPIBELIEF_REPO=$(dirname "$MB_SLURM_DIR")
export MPIBELIEF_REPO

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
    exit 2
}

name="campaign-$(date +%Y%m%d-%H%M%S)" sweep="" dry=0 sbatch_opts=()
while getopts "n:s:o:dh" opt; do
    case $opt in
        n) name=$OPTARG ;;
        s) sweep=$OPTARG ;;
        o) sbatch_opts+=("$OPTARG") ;;
        d) dry=1 ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
configs=()
while [[ $# -gt 0 && $1 != -- ]]; do
    configs+=("$1")
    shift
done
[[ ${1:-} == -- ]] && shift
train_args=("$@")
[[ ${#configs[@]} -ge 1 ]] || usage
mb_parse_train_args "${configs[0]%@*}" "${train_args[@]}"  # for MB_SETS
dir=results/$name
if compgen -G "$dir/*.h5" >/dev/null; then
    mb_die "$dir already holds result files: choose another campaign name (-n)"
fi

# submit ARGS...: sbatch ARGS and print the job id (a made-up one in a dry run).
submit() {
    if [[ $dry -eq 1 ]]; then
        echo "sbatch $*" >&2
        echo "dry$((${#job_ids[@]} + 1))"
        return
    fi
    local out
    out=$(sbatch --parsable "$@") || mb_die "sbatch refused: sbatch $*"
    echo "${out%%;*}"  # --parsable prints ID or ID;CLUSTER
}

# tasks_for SPEC [K=V...]: the task count CONFIG[@NTASKS] asks for with these overrides.
tasks_for() {
    local spec=$1 np=()
    shift
    [[ $spec == *@* ]] && np=(--np "${spec##*@}")
    "$PYTHON" "$MB_SLURM_DIR/world.py" "${np[@]}" "${spec%@*}" "${MB_SETS[@]}" "$@" || exit 2
}

job_ids=() results=()
[[ $dry -eq 1 ]] || mkdir -p "$dir"
for spec in "${configs[@]}"; do
    config=${spec%@*}
    [[ -f $config ]] || mb_die "config $config not found"
    stem=${config##*/}
    stem=${stem%.toml}
    if [[ -z $sweep ]]; then
        tasks=$(tasks_for "$spec")
        out="$dir/$stem.h5"
        [[ $spec == *@* ]] && out="$dir/$stem-$tasks.h5"  # one config at several sizes
        [[ " ${results[*]} " == *" $out "* ]] && mb_die "two runs would write $out"
        id=$(submit --job-name="$name-$stem" --ntasks="$tasks" --output="$dir/%x-%j.out" \
            "${sbatch_opts[@]}" "$MB_SLURM_DIR/train.sbatch" "$config" "${train_args[@]}" --out "$out")
        echo "train $id $config ($tasks tasks) -> $out"
        results+=("$out")
    else
        key=${sweep%%=*}
        IFS=, read -ra values <<<"${sweep#*=}"
        [[ $sweep == *=* && ${#values[@]} -ge 1 ]] || mb_die "-s wants KEY=V1,V2,... (got $sweep)"
        tasks=0
        for value in "${values[@]}"; do
            need=$(tasks_for "$spec" "$key=$value")
            ((need > tasks)) && tasks=$need
            results+=("$(mb_sweep_out "$dir" "$config" "$key" "$value")")
        done
        id=$(submit --job-name="$name-$stem" --ntasks="$tasks" --array="0-$((${#values[@]} - 1))" \
            --output="$dir/%x-%A_%a.out" "${sbatch_opts[@]}" "$MB_SLURM_DIR/sweep.sbatch" --out-dir "$dir" "$config" "$key" \
            "${values[@]}" -- "${train_args[@]}")
        echo "sweep ${id}_[0-$((${#values[@]} - 1))] $config $key=${sweep#*=} ($tasks tasks each) -> $dir/"
    fi
    job_ids+=("$id")
done
after=$(IFS=:; echo "${job_ids[*]}")
id=$(submit --job-name="$name-plot" --dependency="afterok:$after" --output="$dir/%x-%j.out" \
    "$MB_SLURM_DIR/plot.sbatch" "$dir/accuracy.png" "${results[@]}")
echo "plot $id after $after -> $dir/accuracy.png"
