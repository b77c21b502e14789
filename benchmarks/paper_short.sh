#!/usr/bin/env bash
# The paper-resnet18 experiment (recipes/*_cifar10_resnet18.yaml) shortened to what a lent GPU's
# minutes allow: natural training for NATURAL_EPOCHS, then CURE at the paper's settings and TRADES
# (beta 6, otherwise the same recipe) from that model for EPOCHS each, the two at once on the one GPU
# (a ResNet-18 step at batch 128 leaves most of an H200 idle), then each evaluated on the whole
# test split or EVAL_EXAMPLES of it (clean, PGD-20, C&W) and AutoAttack (standard) on AA_EXAMPLES of it. The learning-rate
# schedules are the recipes', compressed to the shorter runs. Every part has its own time limit.
#
#     bash benchmarks/paper_short.sh RESULTS_DIR CIFAR10 [NATURAL_EPOCHS EPOCHS AA_EXAMPLES EVAL_EXAMPLES] 2>&1 | tee RESULTS_DIR.log
#
# TRAIN_EXTRA (extra flags for every training run) is for a smoke run on a CPU, e.g.
# TRAIN_EXTRA="--train-subset 64 --model-kwargs width=4 --eval-subset 20 --mixed-precision no".
set -uo pipefail
cd "$(dirname "$0")/.."
results="${1:?usage: paper_short.sh RESULTS_DIR CIFAR10 [NATURAL_EPOCHS EPOCHS AA_EXAMPLES EVAL_EXAMPLES]}"
dataset="${2:?usage: paper_short.sh RESULTS_DIR CIFAR10 [NATURAL_EPOCHS EPOCHS AA_EXAMPLES EVAL_EXAMPLES]}"
natural_epochs="${3:-20}" epochs="${4:-4}" aa_examples="${5:-1000}" eval_examples="${6:-}"  # none: the whole test split
mkdir -p "$results"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cure_hub=(python3 -m cure_hub.cli)
read -r -a extra <<< "${TRAIN_EXTRA:---mixed-precision bf16 --num-workers 6}"
started=$SECONDS
stamp() { echo "[$((SECONDS - started)) s] $*"; }

stamp "natural: $natural_epochs epochs"
timeout 240 "${cure_hub[@]}" train --recipe recipes/natural_cifar10_resnet18.yaml --dataset "$dataset" \
  --epochs "$natural_epochs" --eval-every-epochs "$natural_epochs" --output-dir "$results/natural" --log-every-steps 100 "${extra[@]}" \
  || exit 1

stamp "cure and trades: $epochs epochs each, at once"
for method in cure trades; do
  flags=(--recipe recipes/cure_cifar10_resnet18.yaml --dataset "$dataset" --init-from "$results/natural" --epochs "$epochs"
         --eval-every-epochs "$epochs" --output-dir "$results/$method" --log-every-steps 100)
  [ "$method" = trades ] && flags+=(--method trades --beta 6)
  timeout 420 "${cure_hub[@]}" train "${flags[@]}" "${extra[@]}" > "$results/$method.log" 2>&1 &
done
wait
tail -n 3 "$results/cure.log" "$results/trades.log"
stamp "evaluation"
for method in natural cure trades; do
  [ -f "$results/$method/summary.json" ] || continue
  ( timeout 150 "${cure_hub[@]}" eval "$results/$method" --dataset "$dataset" --attacks clean,pgd20,cw --batch-size 500 \
      ${eval_examples:+--n-examples "$eval_examples"} \
      --output "$results/eval_$method.json"
    [ "$method" = natural ] || [ "$aa_examples" = 0 ] \
      || timeout 200 "${cure_hub[@]}" eval "$results/$method" --dataset "$dataset" --attacks clean,aa --batch-size 500 \
           --n-examples "$aa_examples" --output "$results/eval_aa_$method.json"
  ) > "$results/eval_$method.log" 2>&1 &
done
wait
tail -n 4 "$results"/eval_*.log
stamp "done"
