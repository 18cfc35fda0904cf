#!/usr/bin/env bash
# Reproduce "Joint or Disjoint: Mixing Training Regimes for Early-Exit Models": joint, disjoint and mixed
# training of the same early-exit model over seeds (phase 1 shared by disjoint and mixed), the paper's
# budget tables, curves and analyses.
#
#   ./reproduce.sh smoke   a toy MLP on synthetic data, 2 seeds, one epoch per phase (seconds; checks the pipeline)
#   ./reproduce.sh cpu     the experiments of RESULTS.md on a 2-core CPU: writes results/ (runs resume; rerun to continue)
#   ./reproduce.sh gpu     the same experiments at the paper's scale (full data, paper-length schedules with early
#                          stopping, CIFAR-10/100 when their files are in $EARLYEXIT_DATA), for a machine with a GPU
#
# Each experiment is one file, configs/NAME.toml: its run settings, what to run with them ([experiment]) and
# what changes for a preset ([preset.gpu]); `python -m earlyexit experiment configs/NAME.toml --preset cpu`
# runs one (--dry prints its steps). Every step resumes: finished runs, comparisons and analyses are skipped,
# started ones continue. Each experiment is one `compare` (or `run`) folder; every run folder holds config.json,
# history.jsonl, results.json, gradients.jsonl where logged, and the weights (results/ keeps no weights: see
# .gitignore). `python -m earlyexit run --config results/EXP/RUN/config.json --out DIR` reruns any one run.
# Set PYTHON to choose the interpreter; set ONLY to a space-separated list of experiment names (configs/NAME.toml)
# to run just those; set DRY=1 to print the steps instead of running them.
set -euo pipefail
PRESET=${1:-}
PY=${PYTHON:-python}
CONFIGS=$(cd "$(dirname "$0")" && pwd)/configs
case "$PRESET" in
    smoke) ROOT=runs/smoke ;;
    cpu) ROOT=results ;;
    gpu) ROOT=results-gpu ;;
    *) echo "usage: $0 smoke|cpu|gpu" >&2; exit 2 ;;
esac

want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }

# the preset's experiments, each after those it reads (an experiment's `after`), else by name
order=$("$PY" -m earlyexit experiment --list --preset "$PRESET" "$CONFIGS"/*.toml)
mapfile -t files <<< "$order"
for f in "${files[@]}"; do
    if [ -n "$f" ] && want "$(basename "$f" .toml)"; then
        "$PY" -m earlyexit experiment "$f" --preset "$PRESET" --root "$ROOT" ${DRY:+--dry}
    fi
done
