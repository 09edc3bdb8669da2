# Two commands on a fresh clone: `make quickstart` and `make test` (both set up .venv if missing).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
QS_CKPT := runs/quickstart/checkpoints/last.ckpt

.PHONY: setup quickstart quickstart-model shipped-model study-demo test test-all test-browser lint format clean

setup: $(STAMP)

# (Re)install when pyproject.toml changes; the stamp keeps `make test` from reinstalling every time.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Starts over: `tadm fit` refuses a fresh run into a folder holding an earlier run's checkpoints (docs/long_runs.md).
quickstart: setup
	rm -rf runs/quickstart
	$(BIN)/tadm fit --config configs/quickstart.yaml
	$(BIN)/tadm validate --config configs/quickstart.yaml --ckpt_path $(QS_CKPT)
	$(BIN)/tadm downscale --ckpt $(QS_CKPT) assets/samples/val --output runs/quickstart/lr --overwrite --no-progress
	$(BIN)/tadm upscale --ckpt $(QS_CKPT) runs/quickstart/lr --output runs/quickstart/restored --overwrite --no-progress

# Retrain the quickstart and ship it: assets/models/quickstart_x16.safetensors (tests check it matches
# configs/quickstart.yaml and keeps flat colours; rerun this after changing that file).
quickstart-model: export OMP_NUM_THREADS = 1
quickstart-model: quickstart
	$(BIN)/tadm export $(QS_CKPT) --output assets/models/quickstart_x16.safetensors --dtype fp32 --overwrite

# Retrain the shipped CPU model and ship it: assets/models/photos_x16.safetensors, what `tadm demo` serves (the
# quickstart DFRM trained 6000 steps on assets/photos/train, then 600 steps on mostly faint crops with the LR kept
# closer to bicubic; docs/shipped_model.md). About 70 min on one core; one torch thread, so the same torch rebuilds the same
# weights. tests/model/test_shipped_models.py checks it matches configs/shipped/photos_x16*.yaml: rerun this
# after changing those or configs/quickstart.yaml. Prints the held-out table at the end and fails if the model misses
# its targets (docs/shipped_model.md "Held-out numbers").
SHIPPED_CKPT := runs/shipped_x16_ft/checkpoints/last.ckpt
shipped-model: export OMP_NUM_THREADS = 1
shipped-model: setup
	rm -rf runs/shipped_x16 runs/shipped_x16_ft
	$(BIN)/tadm fit --config configs/quickstart.yaml --config configs/shipped/photos_x16.yaml
	$(BIN)/tadm fit --config configs/quickstart.yaml --config configs/shipped/photos_x16.yaml \
		--config configs/shipped/photos_x16_finetune.yaml
	$(BIN)/tadm export $(SHIPPED_CKPT) --output assets/models/photos_x16.safetensors --dtype fp32 --overwrite
	$(BIN)/python benchmarks/quality_cpu.py --ckpt assets/models/photos_x16.safetensors --images assets/photos/heldout \
		--require gain=1.5 share=0.9 worst=-0.3 lr_psnr=35

# A 4-cell study on the CPU (configs/studies/demo.yaml, docs/studies.md): trains and evaluates each
# cell, then prints the comparison table; plots in runs/studies/demo/*.png. A rerun keeps finished cells.
# One torch thread: docs/studies.md's numbers (deterministic for a machine and thread count), and faster on a busy 2-core machine.
study-demo: export OMP_NUM_THREADS = 1
study-demo: setup
	$(BIN)/tadm study run configs/studies/demo.yaml

# The fast suite (what CI runs first): two workers (one torch thread each), the slowest tests listed at the end.
test: setup
	$(BIN)/python -m pytest -q -n 2 -m "not slow and not browser" --durations=15

# Every test, the slow ones included (run it before every stop; they are skipped when CI=true); the browser
# test is test-browser's.
test-all: setup
	CI= $(BIN)/python -m pytest -q -n 2 -m "not browser" --durations=15

# `tadm demo` driven in Chromium (tests/demo/test_browser.py; CI runs it after `make test`). First installs what
# it needs when missing: the demo extra and Playwright into .venv, adding packages and changing none (gradio
# asks for an older Pillow than the suite's), and Debian's chromium with apt (as root). Screenshots: runs/browser/.
test-browser: setup
	$(BIN)/python tests/demo/browser_setup.py
	TADM_BROWSER_TEST=required $(BIN)/python -m pytest -q -m browser -rs --durations=5 tests/demo

# The evaluation protocols checked against pyiqa itself (tests/evaluation/test_protocols.py; `make test` skips that
# check). pyiqa declares ~40 dependencies (bitsandbytes, datasets, pyarrow, numba, timm, ...) but its PSNR
# and SSIM need only OpenCV: both go, without dependencies, to a folder of their own inside .venv.
PYIQA_REF := $(VENV)/pyiqa-reference
.PHONY: test-pyiqa
test-pyiqa: setup
	test -d $(PYIQA_REF)/pyiqa || $(BIN)/python -m pip install -q --no-deps --target $(PYIQA_REF) \
		'pyiqa==0.1.16' opencv-python-headless
	PYTHONPATH=$(PYIQA_REF) $(BIN)/python -m pytest -q -rs tests/evaluation/test_protocols.py

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

format: setup
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf runs .pytest_cache .ruff_cache
