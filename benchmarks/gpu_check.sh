#!/usr/bin/env bash
# GPU check: a few training steps of the `tiny` preset and of a ResNet-50 at 224 px (4 large + 2 small views),
# with bf16 autocast and channels_last, printing images/s and peak memory (whole and per image); the memory estimate
# of the paper presets (relicv2.memory) beside it; then the demo-size benchmarks on the card (end-to-end vs lightly,
# FLOP/s utilisation, batch/view scaling). Run it first whenever a GPU is available and record the lines in
# BENCHMARKS.md with the card's name.
# Usage: bash benchmarks/gpu_check.sh [steps]     (about 5-10 minutes on one recent GPU)
#        bash benchmarks/gpu_check.sh --dry-run   the same sequence on the CPU at tiny sizes, one thread, in about a
#                                                 minute: proves that the script works where there is no GPU
#                                                 (tests/test_benchmarks.py runs it); its figures describe no GPU
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
steps=${1:-10}
if [ "$dry" = 1 ]; then
  echo "# gpu_check.sh --dry-run: every step below on the CPU at tiny sizes (a 1/16-wide ResNet-18, 32 px); no figure describes a GPU"
  export OMP_NUM_THREADS=1
  steps=2; dev=cpu; warm=1
  gpu="--set train.device=cpu --set train.precision=bf16 --set encoder.channels_last=true --set data.num_workers=1"
  # the paper preset's recipe (views, loss, optimiser) at tiny sizes
  small="--set encoder.arch=resnet18 --set encoder.width=0.0625 --set encoder.small_stem=true --set heads.projector_hidden=32
    --set heads.projector_out=16 --set heads.predictor_hidden=32 --set data.synthetic_size=32 --set data.image_size=32
    --set views.large_size=32 --set views.small_size=16 --set data.synthetic_train=64"
  paper_batch=16; paper_mem="2,3"; demo_mem="4,8"; quick="--quick --threads 1"
else
  python - <<'PY' || { echo "gpu_check.sh: needs a CUDA device, and torch sees none (torch.cuda.is_available() is False); nothing was measured (--dry-run runs the sequence on the CPU)" >&2; exit 1; }
import sys, torch
if not torch.cuda.is_available(): sys.exit(1)
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY
  dev=cuda; warm=3
  gpu="--set train.device=cuda --set train.precision=bf16 --set encoder.channels_last=true --set data.num_workers=4 --set data.pin_memory=true"
  small=""; paper_batch=128; paper_mem="32,64"; demo_mem=""; quick=""
fi
python benchmarks/train_throughput.py --label "tiny (bf16, channels_last)" --preset tiny $gpu --steps "$steps" --warmup 2
# ResNet-50 at 224 px on synthetic 256 px images (no ImageNet needed): the paper's views, a batch that fits one card.
python benchmarks/train_throughput.py --label "resnet50 224px 4+2 views (bf16, channels_last)" --preset paper $gpu \
  --set data.dataset=synthetic --set data.synthetic_size=256 --set data.image_size=256 --set data.synthetic_train=2048 \
  $small --set train.batch_size=$paper_batch --steps "$steps" --warmup "$warm"
# What relicv2.memory estimates for the paper presets on this device, to set against the peak measured next.
python -c "
import sys; from relicv2.config import preset; from relicv2.memory import check_fits, device_memory, estimate_memory
dev = sys.argv[1]; budget = device_memory(dev) if dev == 'cuda' else 80 * 10**9
for name, world in (('paper-1gpu', 1), ('paper-8gpu', 8), ('paper', 1)):
    print(f'memory_estimate {name} ({world} process(es), {budget / 2**30:.1f} GiB a device):', estimate_memory(preset(name), world))
    try: check_fits(preset(name), world, budget); print('  fits')
    except ValueError as e: print('  ', e)
" "$dev"
# Peak allocated memory per image of the same step (paper preset: ResNet-50, 224 px images, 4 large @ 224 + 2 small
# @ 96), bf16 + channels_last, one fresh process per batch size; the slope between them is the memory of one more image.
python benchmarks/memory.py --device "$dev" $quick --presets paper --paper-batches "$paper_mem" \
  --set train.precision=bf16 --set encoder.channels_last=true $small
python benchmarks/memory.py --device "$dev" $quick --presets demo ${demo_mem:+--demo-batches "$demo_mem"}
# The demo-size benchmarks on the card (fp32): end to end vs the lightly pipeline (needs `pip install lightly`),
# encoder FLOP/s against the card's fp32 GEMM (TF32 off), step time against batch size and views.
if python -c "import lightly" 2>/dev/null; then python benchmarks/e2e.py --device "$dev" $quick ${quick:+--batch-size 8}
else echo "gpu_check.sh: lightly is not installed, skipping benchmarks/e2e.py (pip install lightly)"; fi
python benchmarks/flops.py --device "$dev" $quick ${quick:+--batch-size 8 --gemm-size 256}
python benchmarks/scaling.py --device "$dev" $quick --worlds 1
