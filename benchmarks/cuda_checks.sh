#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one short run (a lent GPU comes with minutes, not hours):
# the CUDA-only tests (FSDP2 through the real launcher among them), FSDP2's peak memory against DDP's
# for a ViT-B step (engine_memory.py), then step_cost.py for ResNet-18 and ViT-S at 32 px (batch 128) in fp32 and
# bf16, with amortised masks and the breakdown, then --compile. Each part has its own time limit,
# so that a slow part costs the parts after it nothing but its own limit.
#
#     bash benchmarks/cuda_checks.sh RESULTS_DIR 2>&1 | tee RESULTS_DIR.log   # the JSON files go to RESULTS_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
results="${1:?usage: cuda_checks.sh RESULTS_DIR}"
mkdir -p "$results"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, transformers, accelerate; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"

timeout 300 python3 -m pytest -q -p no:cacheprovider -rs \
  "tests/test_cure.py::test_masks_on_cuda_match_the_reference_without_host_synchronisation" \
  "tests/test_trainer.py::test_cure_trains_in_fp16_on_cuda_through_the_loss_scaler" \
  "tests/test_trainer.py::test_accelerate_launch_with_fsdp2_trains_cure_on_cuda"

echo "+ engine_memory.py (ViT-B/16 at 224 px, one process: FSDP2's overhead over DDP on one GPU)"
timeout 120 python3 -m torch.distributed.run --nproc_per_node 1 benchmarks/engine_memory.py --device cuda \
  --model vit_base_patch16_224 --image-size 224 --batch-size 32 --attack-steps 2 --bf16 --json "$results/engine_memory_vit_b.json"

for model in cifar_resnet18 vit_small; do
  for precision in fp32 bf16; do
    flags=(--model "$model" --batch-size 128 --repeats 10 --device cuda --mask-interval 4 --breakdown)
    [ "$precision" = bf16 ] && flags+=(--bf16)
    echo "+ step_cost.py ${flags[*]}"
    timeout 90 python3 benchmarks/step_cost.py "${flags[@]}" --json "$results/step_cost_${model}_${precision}.json"
  done
done

echo "+ step_cost.py --compile (cifar_resnet18, fp32)"
timeout 200 python3 benchmarks/step_cost.py --model cifar_resnet18 --batch-size 128 --repeats 10 --device cuda \
  --methods trades,cure --compile --json "$results/step_cost_cifar_resnet18_compile.json"
