#!/usr/bin/env bash
# GPU inference benchmark, prepared to run in one go (< 5 min on one H100, no download):
# full-size SD 2.1-base and SDXL architectures with random weights, x16 upscales to 512x512 and
# 2048x2048 outputs through the same tiled Codec as `tadm upscale`; prints images/s and peak GPU
# memory per case (bf16 autocast, channels_last, SDPA attention, 4 latent tiles per UNet call);
# then the full-size SD VAE's tiled encode / decode at 2048x2048 with per-tile vs synchronised
# GroupNorm statistics (benchmarks/vae_tiling.py --full-size).
#
#   bash benchmarks/gpu_inference.sh                 # uses .venv/bin/python if present, else python
#   PYTHON=python3 bash benchmarks/gpu_inference.sh --compile
# Extra arguments go to benchmarks/upscale.py (e.g. --compile, --precision fp16, --repeats 5, --batches 1 8).
# benchmarks/gpu_all.sh runs the whole GPU set of issue 25 (training steps, batches, --compile, a profile).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" - <<'PY'
import torch, diffusers
print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, cuda {torch.version.cuda}, "
      f"SDPA flash={torch.backends.cuda.flash_sdp_enabled()} mem_efficient={torch.backends.cuda.mem_efficient_sdp_enabled()}")
PY
timeout 290 "$PY" benchmarks/upscale.py --device cuda --precision bf16 --presets sd21-base sdxl \
  --sizes 512x512 2048x2048 --repeats 3 --tile-batch 4 --channels-last --json "$OUT/gpu_inference.json" "$@"
timeout 120 "$PY" benchmarks/vae_tiling.py --full-size 2048 --tile 768 --overlap 128 --device cuda
