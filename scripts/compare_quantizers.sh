#!/usr/bin/env bash
# The quantizer kinds side by side on Fashion-MNIST (README "Comparison of the kinds"): the same
# architecture (configs/vqvae.py:fashion_mnist), steps and seed for every kind and codebook size,
# then each run's rFID / LPIPS on the first NUM test images and one report over all runs.
#
#   bash scripts/compare_quantizers.sh OUT [STEPS=300] [SIZES="512 16384"] [KINDS=...] [NUM=1000]
#
# OUT/wd/KIND-K are the workdirs (a finished run is not trained again), OUT/evals/KIND-K.json
# the evaluations, OUT/report.{md,_grid.png,_curves.png,_bars.png} the comparison.
# KINDS: vq ema fsq lfq simvq ibq rvq2 rvq4 (rvqN = residual VQ of depth N). FSQ's levels for K
# are those of benchmarks/quantizer.py:FSQ_LEVELS; LFQ's bits are log2 K.
# Environment: CONFIG (default configs/vqvae.py:fashion_mnist), EVAL_FLAGS (extra flags for
# vq_jax.evaluate, e.g. "--nolpips"), PYTHON (default python).
set -euo pipefail
OUT=${1:?usage: compare_quantizers.sh OUT [STEPS] [SIZES] [KINDS] [NUM]}
STEPS=${2:-300}
SIZES=${3:-512 16384}
KINDS=${4:-vq ema fsq lfq simvq ibq rvq2 rvq4}
NUM=${5:-1000}
WARMUP=$((STEPS / 10))
CONFIG=${CONFIG:-configs/vqvae.py:fashion_mnist}
PYTHON=${PYTHON:-python}
read -r -a eval_flags <<< "${EVAL_FLAGS:-}"
mkdir -p "$OUT/wd" "$OUT/evals"
workdirs=() evals=() names=()
for K in $SIZES; do
  case $K in
    512) L="(8,8,8)" ;; 4096) L="(8,8,8,8)" ;; 16384) L="(8,8,8,8,4)" ;; 65536) L="(8,8,8,8,4,4)" ;;
    *) L="" ;;
  esac
  for kind in $KINDS; do
    k=$kind extra=()
    case $kind in
      fsq)
        [ -n "$L" ] || { echo "compare_quantizers: no FSQ levels for K=$K; use 512, 4096, 16384 or 65536" >&2; exit 2; }
        extra=(--config.quantizer.fsq.levels="$L") ;;
      rvq*) k=rvq extra=(--config.quantizer.rvq.depth="${kind#rvq}") ;;
    esac
    W=$OUT/wd/$kind-$K
    if [ ! -f "$W/eval/step_$STEPS.json" ]; then
      echo "== train $kind K=$K ($STEPS steps) -> $W"
      "$PYTHON" train.py --config="$CONFIG" --workdir="$W" \
        --config.quantizer.kind="$k" --config.quantizer.codebook_size="$K" "${extra[@]}" \
        --config.train.steps="$STEPS" --config.optimizer.generator.warmup_steps="$WARMUP"
    fi
    E=$OUT/evals/$kind-$K.json
    [ -f "$E" ] || "$PYTHON" -m vq_jax.evaluate --workdir="$W" --split=test --num="$NUM" --out="$E" \
      "${eval_flags[@]}"
    workdirs+=("$W") evals+=("$E") names+=("$kind-$K")
  done
done
join() { local IFS=,; echo "$*"; }
"$PYTHON" -m benchmarks.tokenizer_report --workdirs="$(join "${workdirs[@]}")" \
  --names="$(join "${names[@]}")" --evals="$(join "${evals[@]}")" --out="$OUT/report"
