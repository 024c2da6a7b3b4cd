#!/usr/bin/env bash
# GPU check: a few training steps of the `tiny` preset and of a ResNet-50 at 224 px (4 large + 2 small views),
# with bf16 autocast and channels_last, printing images/s and peak memory. Run it whenever a GPU is available and
# record the lines in BENCHMARKS.md with the card's name. Usage: bash benchmarks/gpu_check.sh [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-10}
python - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device (torch sees none)"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
gpu="--set train.device=cuda --set train.precision=bf16 --set encoder.channels_last=true --set data.num_workers=4 --set data.pin_memory=true"
python benchmarks/train_throughput.py --label "tiny (bf16, channels_last)" --preset tiny $gpu --steps "$steps" --warmup 2
# ResNet-50 at 224 px on synthetic 256 px images (no ImageNet needed): the paper's views, a batch that fits one card.
python benchmarks/train_throughput.py --label "resnet50 224px 4+2 views (bf16, channels_last)" --preset paper $gpu \
  --set data.dataset=synthetic --set data.synthetic_size=256 --set data.image_size=256 --set data.synthetic_train=2048 \
  --set train.batch_size=128 --steps "$steps" --warmup 3
