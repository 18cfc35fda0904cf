#!/usr/bin/env bash
# The paper's main comparison: joint, disjoint and mixed training of the same early-exit model,
# over several seeds, with accuracy-vs-FLOPs curves and the budget table (mean +- std over seeds).
#
#   ./reproduce.sh quick   ResNet-20 on Fashion-MNIST, 2 seeds, short schedules (CPU, about an hour)
#   ./reproduce.sh smoke   a toy MLP on synthetic data, 2 seeds, one epoch per phase (seconds; checks the pipeline)
#   ./reproduce.sh full    ResNet-56 on CIFAR-10 (needs the CIFAR files in $EARLYEXIT_DATA), ViT on CIFAR-10,
#                          BERT (MiniLM-L6) on SST-2; 3 seeds, paper-length schedules (a GPU)
#
# Runs land in runs/<preset>/; each run folder holds config.json, history.jsonl, results.json,
# the weights and curve.png. Set PYTHON to choose the interpreter.
set -euo pipefail
PRESET=${1:-quick}
PY=${PYTHON:-python}
OUT=runs/$PRESET

run() {  # run NAME ARGS...: skip finished runs, resume interrupted ones
    local dir=$OUT/$1; shift
    if [ -f "$dir/results.json" ]; then return; fi
    if [ -f "$dir/checkpoint.pt" ]; then "$PY" -m earlyexit run "$@" --out "$dir" --resume
    else "$PY" -m earlyexit run "$@" --out "$dir"; fi
}

experiment() {  # experiment TAG SEEDS ARGS...: the three regimes over the seeds, then plot and summary
    local tag=$1 seeds=$2; shift 2
    local dirs=()
    for regime in joint disjoint mixed; do
        for seed in $seeds; do
            run "$tag-$regime-s$seed" --regime "$regime" --seed "$seed" "$@"
            dirs+=("$OUT/$tag-$regime-s$seed")
        done
    done
    "$PY" -m earlyexit plot "${dirs[@]}" -o "$OUT/$tag.png" || true  # needs matplotlib
    "$PY" -m earlyexit summary "${dirs[@]}" | tee "$OUT/$tag-summary.txt"
}

mkdir -p "$OUT"
case "$PRESET" in
    smoke)
        experiment mlp-synthetic "0 1" --model mlp --dataset synthetic --epochs 1,1,1 --batch-size 32
        ;;
    quick)
        experiment resnet20-fmnist "0 1" --model resnet20 --dataset fashion-mnist --train-size 20000 --epochs 4,4,4
        ;;
    full)
        experiment resnet56-cifar10 "0 1 2" --model resnet56 --dataset cifar10 --epochs 100,100,100 --lr 0.1,0.05 --patience 20
        experiment vit-cifar10 "0 1 2" --model vit --dataset cifar10 --optimizer adamw --lr 1e-3,5e-4 --epochs 100,100,100 --patience 20
        experiment bert-sst2 "0 1 2" --model bert --weights minilm-l6 --dataset sst2 --optimizer adamw --lr 5e-5,3e-5 \
            --weight-decay 0.01 --epochs 5,5,5 --batch-size 32
        ;;
    *) echo "usage: $0 [smoke|quick|full]" >&2; exit 2 ;;
esac
