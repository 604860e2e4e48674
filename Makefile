# Each target installs what it needs: `make demo` and `make test` work on a fresh machine
# (Python 3.11 + pip, root for apt-get).
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= datasets/fashion-mnist
NPROC ?= 2
PYTEST_ARGS ?=

.PHONY: install data demo test test-all test-slow bench gpu gpu-stage lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	@# the dali extra was DALI's CUDA 12 build: its packages share paths (nvidia/dali, nvimgcodec, libnvcomp) with
	@# the CUDA 13 ones, so they go first (pyproject.toml says why CUDA 13)
	$(PY) -m pip uninstall -q -y nvidia-dali-cuda120 nvidia-nvimgcodec-cu12 nvidia-libnvcomp-cu12 \
		nvidia-nvjpeg-cu12 nvidia-nvjpeg2k-cu12 nvidia-nvtiff-cu12 2>/dev/null || true
	$(PY) -m pip install -q -e '.[dev,dali]'
	touch $@

data: install
	test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)
	$(PY) -m data.prepare fashion-mnist $(DATA)

demo: data
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) train/main.py \
		--config configs/fashion_mnist_resnet.yaml data.root=$(DATA)

test: data  # the demo's 2-epoch accuracy test needs the Fashion-MNIST JPEGs
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: data
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

test-slow: data
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: data  # the CPU benchmarks; on a GPU also `$(PY) benchmarks/gpu.py`
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/monitor.py
	$(PY) benchmarks/checkpoint.py
	$(PY) benchmarks/loader.py

gpu:  # the acceptance call on a lent GPU machine (no venv there: its python3 has torch); docs/gpu.md
	python3 benchmarks/gpu.py $(GPU_ARGS)

gpu-stage: install  # here: DALI + submitit wheels for the device, in parts of <= 56 MiB under .gpu/
	$(PY) benchmarks/gpu.py --stage .gpu

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
