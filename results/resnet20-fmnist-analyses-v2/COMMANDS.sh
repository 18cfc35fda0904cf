#!/usr/bin/env bash
# The paper's analyses (issue 20, items 5, 6 and 9) at the paper's protocols, on the ResNet-20 / Fashion-MNIST
# models of results/resnet20-fmnist-5seeds (experiment: `compare --model resnet20 --dataset fashion-mnist
# --train-size 12000 --epochs 8 --seeds 0,1,2,3,4 --exits every:1`). Writes JSON and PNG figures beside this file.
#
#   bash results/resnet20-fmnist-analyses-v2/COMMANDS.sh       every step (each skipped once its JSON exists)
#   ONLY="rank information" bash .../COMMANDS.sh               some steps: rank information information-s1
#                                                              connectivity plane landscape landscape-uniform figures
#
# Set PYTHON for the interpreter, R for the results folder (default: results). On the 2-core CPU of RESULTS.md
# the steps ran with OMP_NUM_THREADS=1 while another training job held most of the CPU; the numbers do not
# depend on the thread count. Sizes: rank on the whole test split (10,000 samples x 6,000 columns; 34 and 23
# minutes for the three models of seeds 0 and 1); information on the first 5,000 test samples (the whole split
# would take about 15 minutes per model here); connectivity on 1,024 training samples, 11 points per path;
# planes 9 x 9 on 512 training samples; landscapes 9 x 9 (Gaussian) and 7 x 7 (uniform directions) on 512
# training samples. BatchNorm is re-estimated at every point of the paths, planes and landscapes on unaugmented
# training batches of the same size. The last step draws every figure again from the JSON files (--figures-only).
set -euo pipefail
PY=${PYTHON:-python}
R=${R:-results}
A="$R/resnet20-fmnist-5seeds"
O="$R/resnet20-fmnist-analyses-v2"
M=resnet20-fashion-mnist
EE() { "$PY" -m earlyexit "$@"; }
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
todo() { [ ! -f "$1" ]; }  # a step whose JSON exists is done
mkdir -p "$O"

# Fig. 3: the authors' rank (rank of the centred covariance, torch.linalg.matrix_rank's tolerance k x eps on its
# eigenvalues) on the same 6,000 seeded columns for every layer wide enough, the whole test split.
if want rank; then
    for s in 0 1; do
        if todo "$O/rank-s$s.json"; then
            EE analyze "$A/$M-joint-s$s" "$A/$M-mixed-s$s" "$A/$M-disjoint-s$s" --what rank --max-samples 10000 \
                --features 6000 --rank-tol covariance --columns shared --memory-gib 4 --device cpu \
                --out "$O/rank-s$s.json"
        fi
    done
fi

# Fig. 5: I(X; Z) by the Jensen (Kolchinsky-Tracey) upper bound, the Bhattacharyya lower bound and Monte Carlo
# (1,000 reference samples), noise sigma = 0.25 x each layer's median pairwise distance.
info() {  # info SEED
    if todo "$O/information-s$1.json"; then
        EE analyze "$A/$M-joint-s$1" "$A/$M-mixed-s$1" "$A/$M-disjoint-s$1" --what information \
            --max-samples 5000 --features 6000 --columns shared --mi-method jensen,bhattacharyya,mc \
            --mi-ref-size 1000 --sigma 0.25 --sigma-ref median --distance-dtype float32 --memory-gib 4 \
            --device cpu --out "$O/information-s$1.json"
    fi
}
if want information; then info 0; fi
if want information-s1; then info 1; fi

# Appendix D.8: the linear path between mixed and disjoint models of different seeds, and the same-regime
# baselines, weight-matched, BatchNorm re-estimated at every point.
if want connectivity; then
    for pair in mixed-s0:disjoint-s1 mixed-s1:disjoint-s0 joint-s0:joint-s1 mixed-s0:mixed-s1 \
                disjoint-s0:disjoint-s1 mixed-s0:disjoint-s0 joint-s0:mixed-s0; do
        a=${pair%%:*}; b=${pair##*:}
        if todo "$O/connectivity-$a-$b.json"; then
            EE analyze "$A/$M-$a" --other "$A/$M-$b" --what connectivity --steps 11 --max-samples 1024 \
                --device cpu --out "$O/connectivity-$a-$b.json"
        fi
    done
fi

# Fig. 2 / appendix D.8: the plane through mixed, disjoint (another seed) and joint, one colour scale for all.
if want plane; then
    for trio in mixed-s0:disjoint-s1:joint-s0 mixed-s1:disjoint-s0:joint-s1; do
        IFS=: read -r a b c <<< "$trio"
        if todo "$O/plane-$a-$b-$c.json"; then
            EE analyze "$A/$M-$a" --other "$A/$M-$b" --third "$A/$M-$c" --what plane --steps 9 --max-samples 512 \
                --plane-range 0,2.5 --device cpu --out "$O/plane-$a-$b-$c.json"
        fi
    done
fi

# Appendix A: loss landscapes, BatchNorm re-estimated at every grid point, one colour scale over the three regimes.
if want landscape && todo "$O/landscape-gaussian.json"; then
    EE analyze "$A/$M-joint-s0" "$A/$M-mixed-s0" "$A/$M-disjoint-s0" --what landscape --landscape-steps 9,9 \
        --landscape-span 1.0 --landscape-direction gaussian --max-samples 512 --device cpu \
        --out "$O/landscape-gaussian.json"
fi
if want landscape-uniform && todo "$O/landscape-uniform.json"; then
    EE analyze "$A/$M-joint-s0" "$A/$M-mixed-s0" "$A/$M-disjoint-s0" --what landscape --landscape-steps 7,7 \
        --landscape-span 1.0 --landscape-direction uniform --max-samples 512 --device cpu \
        --out "$O/landscape-uniform.json"
fi

# Every figure again from its JSON (the current drawing code; nothing is measured).
if want figures; then
    for f in "$O"/*.json; do
        case $(basename "$f") in
            plane-*) EE analyze "$A/$M-joint-s0" --figures-only --plane-range 0,2.5 --out "$f" ;;
            *) EE analyze "$A/$M-joint-s0" --figures-only --out "$f" ;;
        esac
    done
fi
