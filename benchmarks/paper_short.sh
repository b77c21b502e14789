#!/usr/bin/env bash
# The paper-resnet18 experiment (recipes/*_cifar10_resnet18.yaml) shortened to what a lent GPU's
# minutes allow: natural training for NATURAL_EPOCHS, then, from that model and all at once on the one
# GPU (a ResNet-18 step at batch 128 leaves most of an H200 idle), for EPOCHS each: PGD-AT, TRADES
# (beta 6), CURE as the recipe (cure-hub's default settings) and CURE with --cure-settings paper
# (the paper's text read literally, beta 1 included), every one otherwise the CURE recipe's. Each is
# then evaluated on the whole test split or EVAL_EXAMPLES of it (clean, PGD-20, C&W) and AutoAttack
# (standard) on AA_EXAMPLES of it. The learning-rate schedules are the recipes', compressed to the
# shorter runs. Every part has its own time limit; the whole fits 9 minutes on an H200 (docs/cure.md).
#
#     bash benchmarks/paper_short.sh RESULTS_DIR CIFAR10 [NATURAL_EPOCHS EPOCHS AA_EXAMPLES EVAL_EXAMPLES] 2>&1 | tee RESULTS_DIR.log
#
# TRAIN_EXTRA (extra flags for every training run) is for a smoke run on a CPU, e.g.
# TRAIN_EXTRA="--train-subset 64 --model-kwargs width=4 --eval-subset 20 --mixed-precision no"; RUNS
# names the fine-tuning runs to make (default: all four).
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

declare -A run_flags=(
  [pgd_at]="--method pgd_at"
  [trades]="--method trades --beta 6"
  [cure]=""
  [cure_paper]="--cure-settings paper --beta 1"
)
read -r -a runs <<< "${RUNS:-pgd_at trades cure cure_paper}"
stamp "${runs[*]}: $epochs epochs each, at once"
for run in "${runs[@]}"; do
  read -r -a own <<< "${run_flags[$run]}"
  timeout 300 "${cure_hub[@]}" train --recipe recipes/cure_cifar10_resnet18.yaml --dataset "$dataset" \
    --init-from "$results/natural" --epochs "$epochs" --eval-every-epochs "$epochs" --output-dir "$results/$run" \
    --log-every-steps 10 "${own[@]}" "${extra[@]}" > "$results/$run.log" 2>&1 &
done
wait
for run in "${runs[@]}"; do tail -n 2 "$results/$run.log"; done
stamp "evaluation"
for method in natural "${runs[@]}"; do
  [ -f "$results/$method/summary.json" ] || continue
  ( timeout 120 "${cure_hub[@]}" eval "$results/$method" --dataset "$dataset" --attacks clean,pgd20,cw --batch-size 500 \
      ${eval_examples:+--n-examples "$eval_examples"} \
      --output "$results/eval_$method.json"
    [ "$method" = natural ] || [ "$aa_examples" = 0 ] \
      || timeout 150 "${cure_hub[@]}" eval "$results/$method" --dataset "$dataset" --attacks clean,aa --batch-size 500 \
           --n-examples "$aa_examples" --output "$results/eval_aa_$method.json"
  ) > "$results/eval_$method.log" 2>&1 &
done
wait
tail -n 4 "$results"/eval_*.log
stamp "done"
