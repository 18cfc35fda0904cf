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
# Each experiment is one `compare` (or `run`) folder; every run folder holds config.json, history.jsonl,
# results.json, gradients.jsonl where logged, and the weights (results/ keeps no weights: see .gitignore).
# `python -m earlyexit run --config results/EXP/RUN/config.json --out DIR` reruns any one run. Set PYTHON to
# choose the interpreter; set ONLY to a space-separated list of experiment names to run just those.
set -euo pipefail
PRESET=${1:-}
PY=${PYTHON:-python}
EE() { "$PY" -m earlyexit "$@"; }

want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }

compare() {  # compare OUT ARGS...: the three regimes over the seeds, resumable
    local out=$1; shift
    if [ -f "$out/summary.json" ]; then return; fi
    if [ -d "$out" ]; then EE compare "$@" --out "$out" --resume; else EE compare "$@" --out "$out"; fi
}

matched() {  # matched OUT ARGS...: the matched-budget joint runs beside a finished paper-budget comparison
    local out=$1; shift
    if [ -f "$out/summary-matched.json" ]; then return; fi
    EE compare "$@" --budget matched --out "$out" --resume
}

run_one() {  # run_one OUT ARGS...: one run, resumable
    local out=$1; shift
    if [ -f "$out/results.json" ]; then return; fi
    if [ -f "$out/checkpoint.pt" ]; then EE run "$@" --out "$out" --resume; else EE run "$@" --out "$out"; fi
}

analyses() {  # analyses R SAMPLES STEPS: experiment 4 on the seed-0 models of R/resnet20-fmnist
    local R=$1 n=$2 steps=$3 A=$1/resnet20-fmnist pair
    mkdir -p "$R/resnet20-fmnist-analyses"
    EE analyze "$A"/resnet20-fashion-mnist-{joint,disjoint,mixed}-s0 --what rank,information,gradients,landscape,plane \
        --max-samples "$n" --steps "$steps" --landscape-steps 11,11 --out "$R/resnet20-fmnist-analyses/analysis.json"
    # the rank of $n samples is capped at $n, and at sigma 0.1 I(X;Z) saturates at log $n: both again,
    # the rank on the whole test split (2,000 columns) and I(X;Z) at sigma 20
    EE analyze "$A"/resnet20-fashion-mnist-{joint,disjoint,mixed}-s0 --what rank --max-samples 10000 \
        --features 2000 --out "$R/resnet20-fmnist-analyses/rank-full-test.json"
    EE analyze "$A"/resnet20-fashion-mnist-{joint,disjoint,mixed}-s0 --what information --sigma 20 \
        --max-samples "$n" --out "$R/resnet20-fmnist-analyses/information-sigma20.json"
    for pair in "joint disjoint" "joint mixed" "disjoint mixed"; do
        set -- $pair
        EE analyze "$A/resnet20-fashion-mnist-$1-s0" --other "$A/resnet20-fashion-mnist-$2-s0" --what connectivity \
            --steps "$steps" --max-samples "$n" --out "$R/resnet20-fmnist-analyses/connectivity-$1-$2.json"
    done
}

density_figure() {  # density_figure R: the three IC densities' comparisons in one figure (colour: regime, line: density)
    mkdir -p "$1/vit-fmnist-density"
    EE plot "$1"/vit-fmnist-every{1,2,3}/vit-fashion-mnist-* -o "$1/vit-fmnist-density/curves.png"
}

case "$PRESET" in
    smoke)
        OUT=runs/smoke
        mkdir -p "$OUT"
        dirs=()
        for regime in joint disjoint mixed; do
            for seed in 0 1; do
                run_one "$OUT/mlp-synthetic-$regime-s$seed" --model mlp --dataset synthetic --epochs 1,1,1 \
                    --batch-size 32 --regime "$regime" --seed "$seed"
                dirs+=("$OUT/mlp-synthetic-$regime-s$seed")
            done
        done
        EE plot "${dirs[@]}" -o "$OUT/mlp-synthetic.png" || true  # needs matplotlib
        EE summary "${dirs[@]}" | tee "$OUT/mlp-synthetic-summary.txt"
        ;;
    cpu)
        R=results
        # 1. ResNet-20 on Fashion-MNIST (12,000 images: 10,800 train, 1,200 validation), an IC after every
        #    block, SGD; gradient cosines logged every 20 steps; then the matched-budget control.
        FM=(--model resnet20 --dataset fashion-mnist --train-size 12000 --epochs 8 --seeds 0,1,2)
        if want resnet20; then
            compare "$R/resnet20-fmnist" "${FM[@]}" --exits every:1 --grad-log-every 20
            matched "$R/resnet20-fmnist" "${FM[@]}" --exits every:1 --grad-log-every 20
        fi
        # 1b. the paper's placement (every other block from the fifth), one seed
        if want resnet20-paper-exits; then
            compare "$R/resnet20-fmnist-paper-exits" --model resnet20 --dataset fashion-mnist --train-size 12000 \
                --epochs 8 --seeds 0
        fi
        # 6. undertrained backbone (Figure 13): mixed with phase 1 cut to a quarter of its epochs
        if want undertrained; then
            for seed in 0 1 2; do
                run_one "$R/resnet20-fmnist-undertrained/resnet20-fashion-mnist-mixed-s$seed" --model resnet20 \
                    --dataset fashion-mnist --train-size 12000 --exits every:1 --epochs "2;8;8" --regime mixed --seed "$seed"
            done
        fi
        # 2. the paper's ViT (patch 4, width 256, 7 blocks, 8 heads; ICs after blocks 2-6, the 7th is the final
        #    exit), AdamW without weight decay, phase-1 lr 5e-4, phases 2/3 choose from a small grid.
        #    A ViT step costs about 7x a ResNet-20 step on the CPU: 6,000 images (5,400 train) and 5 epochs per phase.
        VIT=(--model vit --dataset fashion-mnist --train-size 6000 --optimizer adamw --weight-decay 0 --epochs 5
             --batch-size 128)
        if want vit; then compare "$R/vit-fmnist" "${VIT[@]}" --lr "5e-4;1e-3,5e-4;1e-3,5e-4" --seeds 0,1,2; fi
        # 5. IC density (heads every 1, 2, 3 blocks) and IC size (the appendix's heads) on that ViT, 2 seeds.
        #    Phases 2/3 at 1e-3 only: the rate validation chose in all three regimes of experiment 2's seed 0,
        #    which halves their cost.
        VIT5=("${VIT[@]}" --lr "5e-4;1e-3;1e-3")
        if want vit-density; then
            for n in 1 2 3; do compare "$R/vit-fmnist-every$n" "${VIT5[@]}" --exits "every:$n" --seeds 0,1; done
            density_figure "$R"
        fi
        if want vit-heads; then
            for head in mlp1024; do compare "$R/vit-fmnist-head-$head" "${VIT5[@]}" --model-opt "head=$head" --seeds 0,1; done
        fi
        # 3. BERT with the MiniLM-L6 weights on SST-2 (AdamW, cosine, weight decay 1e-4, batch 32)
        if want bert; then
            compare "$R/bert-sst2" --model bert --weights minilm-l6 --model-opt head_pool=mean --dataset sst2 \
                --optimizer adamw --lr 5e-5 --weight-decay 1e-4 --batch-size 32 --epochs 2 --seeds 0,1,2
        fi
        # 4. the analyses of the seed-0 models of experiment 1 (one per regime): 512 samples, a 15 x 15 plane
        if want analyses && [ -f "$R/resnet20-fmnist/summary.json" ]; then analyses "$R" 512 15; fi
        # The verdicts' reruns (RESULTS.md, "Decision rule"): experiment 1 at the paper code's ResNet defaults (no
        # gradient clipping; a 20-step lr warmup keeps the fresh ICs stable) with 5 seeds and its epoch-matched joint
        if want resnet20-5seeds; then
            FM5=(--model resnet20 --dataset fashion-mnist --train-size 12000 --epochs 8 --seeds 0,1,2,3,4 --exits every:1)
            compare "$R/resnet20-fmnist-5seeds" "${FM5[@]}"
            matched "$R/resnet20-fmnist-5seeds" "${FM5[@]}"
        fi
        # Figure 13 as the paper: phase 1 at a low, non-optimal lr (0.001 instead of 0.1), the same 8 + 8 epochs as
        # the normal mixed run of resnet20-fmnist-5seeds; joint and normal mixed of that folder in the same figure
        if want undertrained-lr; then
            for seed in 0 1 2; do
                run_one "$R/resnet20-fmnist-undertrained-lr/resnet20-fashion-mnist-mixed-s$seed" --model resnet20 \
                    --dataset fashion-mnist --train-size 12000 --exits every:1 --epochs 8 --lr "0.001;0.1;0.1" \
                    --regime mixed --seed "$seed"
            done
            F=$R/resnet20-fmnist-5seeds/resnet20-fashion-mnist
            EE plot "$F"-joint-matched-s{0,1,2} "$F"-mixed-s{0,1,2} "$R"/resnet20-fmnist-undertrained-lr/*-s? \
                --note "joint: the matched budget (16 epochs); mixed: 8 + 8 epochs" \
                -o "$R/resnet20-fmnist-undertrained-lr/curves.png"
        fi
        # why joint's final exit trails: joint at the matched budget (16 epochs) with Han et al.'s weights rising
        # with depth (0.6 .. 1.4), so the final exit weighs 1.4 / 0.6 of the first IC instead of the mean's 1
        if want joint-han; then
            for seed in 0 1 2; do
                run_one "$R/resnet20-fmnist-joint-han/resnet20-fashion-mnist-joint-han-s$seed" --model resnet20 \
                    --dataset fashion-mnist --train-size 12000 --exits every:1 --epochs 16 --weighting han \
                    --regime joint --seed "$seed"
            done
        fi
        # matched-budget joint beside the committed BERT and ViT comparisons, with those comparisons' own settings
        # (both clipped at norm 1 and ran without warmup)
        if want bert-matched; then
            matched "$R/bert-sst2" --model bert --weights minilm-l6 --model-opt head_pool=mean --dataset sst2 \
                --optimizer adamw --lr 5e-5 --weight-decay 1e-4 --batch-size 32 --epochs 2 --seeds 0,1,2 \
                --grad-clip 1 --warmup 0
        fi
        if want vit-matched; then matched "$R/vit-fmnist" "${VIT[@]}" --lr "5e-4;1e-3,5e-4;1e-3,5e-4" --seeds 0,1,2 --warmup 0; fi
        ;;
    gpu)
        R=results-gpu
        FM=(--model resnet20 --dataset fashion-mnist --epochs 100 --patience 20 --lr "0.1;0.1,0.05;0.1,0.05" --seeds 0,1,2)
        if want resnet20; then
            compare "$R/resnet20-fmnist" "${FM[@]}" --exits every:1 --grad-log-every 100
            matched "$R/resnet20-fmnist" "${FM[@]}" --exits every:1 --grad-log-every 100
        fi
        if want cifar && "$PY" -c "import earlyexit as e; e.load_dataset('cifar10', train_size=10)" 2>/dev/null; then
            compare "$R/resnet56-cifar10" --model resnet56 --dataset cifar10 --epochs 100 --patience 20 \
                --lr "0.1;0.1,0.05;0.1,0.05" --seeds 0,1,2
            compare "$R/vit-cifar10" --model vit --dataset cifar10 --optimizer adamw --weight-decay 0 \
                --lr "5e-4;1e-3,5e-4;1e-3,5e-4" --epochs 100 --patience 20 --seeds 0,1,2
        fi
        if want resnet20-paper-exits; then compare "$R/resnet20-fmnist-paper-exits" "${FM[@]}"; fi
        if want undertrained; then  # phase 1 cut to a quarter of its epochs
            for seed in 0 1 2; do
                run_one "$R/resnet20-fmnist-undertrained/resnet20-fashion-mnist-mixed-s$seed" --model resnet20 \
                    --dataset fashion-mnist --exits every:1 --epochs "25;100;100" --patience 20 \
                    --lr "0.1;0.1;0.1" --regime mixed --seed "$seed"
            done
        fi
        VIT=(--model vit --dataset fashion-mnist --optimizer adamw --weight-decay 0
             --lr "5e-4;1e-3,5e-4;1e-3,5e-4" --epochs 100 --patience 20 --seeds 0,1,2)
        if want vit; then compare "$R/vit-fmnist" "${VIT[@]}"; fi
        if want vit-density; then
            for n in 1 2 3; do compare "$R/vit-fmnist-every$n" "${VIT[@]}" --exits "every:$n"; done
            density_figure "$R"
        fi
        if want vit-heads; then
            for head in mlp1024; do compare "$R/vit-fmnist-head-$head" "${VIT[@]}" --model-opt "head=$head"; done
        fi
        if want bert; then
            compare "$R/bert-sst2" --model bert --weights minilm-l6 --model-opt head_pool=mean --dataset sst2 \
                --optimizer adamw --lr "5e-5,3e-5" --weight-decay 1e-4 --batch-size 32 --epochs 5 --patience 2 --seeds 0,1,2
        fi
        # the analyses at the paper's sizes: 2,000 samples, a 21 x 21 plane
        if want analyses && [ -f "$R/resnet20-fmnist/summary.json" ]; then analyses "$R" 2000 21; fi
        if want resnet20-5seeds; then
            compare "$R/resnet20-fmnist-5seeds" "${FM[@]}" --seeds 0,1,2,3,4 --exits every:1
            matched "$R/resnet20-fmnist-5seeds" "${FM[@]}" --seeds 0,1,2,3,4 --exits every:1
        fi
        if want undertrained-lr; then  # phase 1 at a low, non-optimal lr
            for seed in 0 1 2; do
                run_one "$R/resnet20-fmnist-undertrained-lr/resnet20-fashion-mnist-mixed-s$seed" --model resnet20 \
                    --dataset fashion-mnist --exits every:1 --epochs 100 --patience 20 --lr "0.001;0.1;0.1" \
                    --regime mixed --seed "$seed"
            done
            F=$R/resnet20-fmnist-5seeds/resnet20-fashion-mnist
            EE plot "$F"-joint-matched-s{0,1,2} "$F"-mixed-s{0,1,2} "$R"/resnet20-fmnist-undertrained-lr/*-s? \
                --note "joint: the matched budget; mixed: phases 1 and 2 as long as early stopping lets them" \
                -o "$R/resnet20-fmnist-undertrained-lr/curves.png"
        fi
        if want joint-han; then  # joint with weights rising with depth, at 200 epochs (mixed's phases 1 + 2)
            for seed in 0 1 2; do
                run_one "$R/resnet20-fmnist-joint-han/resnet20-fashion-mnist-joint-han-s$seed" --model resnet20 \
                    --dataset fashion-mnist --exits every:1 --epochs 200 --patience 20 --weighting han \
                    --regime joint --seed "$seed"
            done
        fi
        ;;
    *) echo "usage: $0 smoke|cpu|gpu" >&2; exit 2 ;;
esac
