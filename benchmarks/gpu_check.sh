#!/usr/bin/env bash
# GPU check: a few training steps of the `tiny` preset and of a ResNet-50 at 224 px (4 large + 2 small views),
# with bf16 autocast and channels_last, printing images/s and peak memory (whole and per image); then the demo-size
# benchmarks on the card (end-to-end vs lightly, FLOP/s utilisation, batch/view scaling). Run it whenever a GPU is
# available and record the lines in BENCHMARKS.md with the card's name.
# Usage: bash benchmarks/gpu_check.sh [steps]     (about 5-10 minutes on one recent GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-10}
python - <<'PY' || { echo "gpu_check.sh: needs a CUDA device, and torch sees none (torch.cuda.is_available() is False); nothing was measured" >&2; exit 1; }
import sys, torch
if not torch.cuda.is_available(): sys.exit(1)
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY
gpu="--set train.device=cuda --set train.precision=bf16 --set encoder.channels_last=true --set data.num_workers=4 --set data.pin_memory=true"
python benchmarks/train_throughput.py --label "tiny (bf16, channels_last)" --preset tiny $gpu --steps "$steps" --warmup 2
# ResNet-50 at 224 px on synthetic 256 px images (no ImageNet needed): the paper's views, a batch that fits one card.
python benchmarks/train_throughput.py --label "resnet50 224px 4+2 views (bf16, channels_last)" --preset paper $gpu \
  --set data.dataset=synthetic --set data.synthetic_size=256 --set data.image_size=256 --set data.synthetic_train=2048 \
  --set train.batch_size=128 --steps "$steps" --warmup 3
# Peak allocated memory per image of the same step (paper preset: ResNet-50, 224 px images, 4 large @ 224 + 2 small
# @ 96), bf16 + channels_last, one fresh process per batch size; the slope between them is the memory of one more image.
python benchmarks/memory.py --device cuda --presets paper --paper-batches 32,64 \
  --set train.precision=bf16 --set encoder.channels_last=true
python benchmarks/memory.py --device cuda --presets demo
# The demo-size benchmarks on the card (fp32): end to end vs the lightly pipeline (needs `pip install lightly`),
# encoder FLOP/s against the card's fp32 GEMM (TF32 off), step time against batch size and views.
if python -c "import lightly" 2>/dev/null; then python benchmarks/e2e.py --device cuda
else echo "gpu_check.sh: lightly is not installed, skipping benchmarks/e2e.py (pip install lightly)"; fi
python benchmarks/flops.py --device cuda
python benchmarks/scaling.py --device cuda --worlds 1
