#!/usr/bin/env bash
# Every GPU measurement of issue 25 in one command, prepared to finish in under 8 minutes on one H100 / H200
# with full-size random weights (no download); the numbers go to $OUT (default benchmarks/results):
#   1. training (gpu_training.py): stage 1, 2, 3 of the one-GPU recipe on SD 2.1-base and stage 2 on SDXL,
#      512-px crops, bf16-mixed, gradient checkpointing: s / step after warm-up, peak GPU memory, next to
#      the CPU estimates           -> gpu_training.json, gpu_training.md
#   2. inference, eager (upscale.py): sd21-base and sdxl, 512x512 and 2048x2048, batch 1 and 8, bf16,
#      channels_last, SDPA: images/s, UNet / decoder / statistics pass / the rest, host syncs, peak memory;
#      torch.profiler of the 512-px case            -> gpu_inference.json, gpu_inference.md, gpu_profile.txt
#   3. inference, --compile (torch.compile of UNet, DFRM upscale, TPM, Refiner): sd21-base 512x512, batch 1, 8
#                                                  -> gpu_compile.json, gpu_compile.md
#   and everything printed                         -> gpu_all.log
# Each step has its own time limit and writes its files as it goes, so a slow step costs only its own rest.
#
#   bash benchmarks/gpu_all.sh                      # uses $PYTHON, else .venv/bin/python, else python3
#   TADM_WHEELS=.whl bash benchmarks/gpu_all.sh     # first installs the packages python lacks from these wheels
#   bash benchmarks/gpu_all.sh --dry-run            # on a CPU: the same steps on tiny twins (catches typos)
#
# Packages: torch, torchvision, diffusers, transformers, lightning, jsonargparse[signatures], peft, torchmetrics,
# lpips, webdataset, safetensors, rich (tadm's own dependencies; tadm itself runs from this checkout). Where
# `python -c 'import ...'` fails, the wheels in $TADM_WHEELS (default .whl) are installed into /tmp/tadm-site
# without any index; benchmarks/README.md ("On a GPU") says how to fill that folder with `pip download`.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
NEED='import torch, torchvision, diffusers, transformers, lightning, jsonargparse, peft, torchmetrics, lpips, webdataset, safetensors, rich'
if ! "$PY" -c "$NEED" 2>/dev/null; then
  WHEELS=${TADM_WHEELS:-.whl}
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "installing the wheels in $WHEELS into /tmp/tadm-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tadm-site \
      "$WHEELS"/*.whl || exit 2
    export PYTHONPATH=/tmp/tadm-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PY" -c "$NEED" || {
    echo "gpu_all.sh: $PY lacks a package above; put its wheels in \$TADM_WHEELS (benchmarks/README.md, 'On a GPU')"
    exit 2
  }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  DEV=(--device cpu) TINY=(--tiny) SIZES=(128x128 256x256) TRAIN_TIMEOUT=900 STEP_TIMEOUT=900 COMPILE_TIMEOUT=900
  PRECISION=fp32 COMPILE_BATCHES=(1)  # inductor on a CPU: about a minute per shape even for the tiny twin
else
  # compile: 4 graphs (UNet, DFRM upscale, TPM, hybrid scheduler) per shape, batch 8 a second shape
  DEV=(--device cuda) TINY=() SIZES=(512x512 2048x2048) TRAIN_TIMEOUT=190 STEP_TIMEOUT=130
  PRECISION=bf16 COMPILE_BATCHES=(1 8) COMPILE_TIMEOUT=150
fi

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'PY'
import diffusers, lightning, peft, torch
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__} (cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}), "
      f"diffusers {diffusers.__version__}, lightning {lightning.__version__}, peft {peft.__version__}, "
      f"GPU {torch.cuda.get_device_name() if cuda else 'none'}, "
      f"SDPA flash={torch.backends.cuda.flash_sdp_enabled()} mem_efficient={torch.backends.cuda.mem_efficient_sdp_enabled()}")
PY
  start=$SECONDS
  echo "== 1. training steps (limit ${TRAIN_TIMEOUT} s)"
  timeout "$TRAIN_TIMEOUT" "$PY" benchmarks/gpu_training.py "${DEV[@]}" "${TINY[@]}" --micro-steps 3 --timeout 90 \
    --json "$OUT/gpu_training.json" --markdown "$OUT/gpu_training.md"
  echo "training: rc=$? after $((SECONDS - start)) s"
  echo "== 2. inference, eager (limit ${STEP_TIMEOUT} s)"
  timeout "$STEP_TIMEOUT" "$PY" benchmarks/upscale.py "${DEV[@]}" "${TINY[@]}" --precision "$PRECISION" \
    --presets sd21-base sdxl --sizes "${SIZES[@]}" --batches 1 8 --repeats 5 --seconds-per-case 4 \
    --tile-batch 4 --channels-last --sync-count --op-counts --profile --profile-out "$OUT/gpu_profile.txt" \
    --json "$OUT/gpu_inference.json" --markdown "$OUT/gpu_inference.md"
  echo "inference: rc=$? after $((SECONDS - start)) s"
  echo "== 3. inference, --compile (limit ${COMPILE_TIMEOUT} s)"
  timeout "$COMPILE_TIMEOUT" "$PY" benchmarks/upscale.py "${DEV[@]}" "${TINY[@]}" --precision "$PRECISION" \
    --presets sd21-base --sizes "${SIZES[0]}" --batches "${COMPILE_BATCHES[@]}" --repeats 5 --seconds-per-case 4 \
    --tile-batch 4 --channels-last --modes compile --json "$OUT/gpu_compile.json" \
    --markdown "$OUT/gpu_compile.md"
  echo "compile: rc=$? after $((SECONDS - start)) s"
} 2>&1 | tee "$OUT/gpu_all.log"
