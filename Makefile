# Two commands do all set-up on a fresh machine:
#   make test    create .venv, install torch + the package with its extensions, run the test suite
#   make bench   same set-up, then run the benchmark report
# Overridable: PYTHON, VENV, TORCH_SPEC, TORCHVISION_SPEC, MAX_JOBS, TORCH_CUDA_ARCH_LIST.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
TORCHVISION_SPEC ?= torchvision==0.29.1
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
BENCH_ARGS ?= --model yolov12s-anydepth --model rtdetr-r50-anydepth --imgsz 640 --kernels --compile
PYTEST_ARGS ?=
# the suite runs in TEST_WORKERS processes (pytest-xdist; a test file stays in one process, so its
# module fixtures are built once); files are handed out in collection order, the heaviest first
# (tests/conftest.py::HEAVY_FILES; --no-loadscope-reorder keeps that order); TEST_WORKERS=0 runs
# it in this process
TEST_WORKERS ?= 2
ifeq ($(TEST_WORKERS),0)
XDIST_ARGS :=
else
XDIST_ARGS := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
endif

# nvcc lives here on the development machines; the CUDA extension is built when it is found.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
export MAX_JOBS

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*/*.cpp csrc/*/*.cu)

.PHONY: test lint bench demo install gpu-check clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)" "$(TORCHVISION_SPEC)"
	touch $@

# Editable install: compiles the extensions in place (ninja, MAX_JOBS jobs); reruns when a
# C++/CUDA source or the build files change.
$(VENV)/.installed: $(VENV)/.torch $(SOURCES)
	$(PIP) install -q ninja "setuptools>=64" wheel
	$(PIP) install --no-build-isolation -e ".[test,triton]"
	$(PY) -c "import anydepth, anydepth_kernels, json; print(json.dumps(anydepth_kernels.extension_info(), indent=1))"
	touch $@

install: $(VENV)/.installed

# Triton 3.6 (the GPU machines' version) beside the venv's own, for the AOT-compile tests (they
# compile with both; tests/conftest.py::aot_triton): triton's files only, no second torch. The
# stamp lives in the folder, so deleting the folder reinstalls it.
TRITON36_SPEC ?= triton==3.6.0
$(VENV)/triton36/.installed: $(VENV)/.torch
	rm -rf $(VENV)/triton36
	$(PIP) install -q --no-deps --target $(VENV)/triton36 "$(TRITON36_SPEC)"
	touch $@

# lint (ruff: pycodestyle + pyflakes; mypy: the types of anydepth_kernels; config in
# pyproject.toml), then the whole suite
lint: $(VENV)/.installed
	$(PY) -m ruff check anydepth anydepth_kernels tests bench tools setup.py
	$(PY) -m mypy

test: lint $(VENV)/.installed $(VENV)/triton36/.installed
	$(PY) -m pytest tests $(XDIST_ARGS) $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(VENV)/bin/anydepth bench $(BENCH_ARGS)

# Synthetic data -> stage 1: static yolov12n / rtdetr-r18 (full depth only) -> stage 2: any-depth
# fine-tuning from it, distillation on and off -> COCO AP at every depth. Results: $(DEMO_OUT)/RESULTS.md
DEMO_OUT ?= runs/demo
DEMO_ARGS ?=
demo: $(VENV)/.installed
	$(VENV)/bin/anydepth demo --out $(DEMO_OUT) $(DEMO_ARGS)

# One-shot GPU check (a fresh GPU machine with its own torch/triton/pytest, no network): builds for
# the machine's architecture (sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise, failing loudly), runs
# the GPU tests next to compute-sanitizer, then per-depth end-to-end (eager / fused / CUDA graphs)
# and kernel benchmarks, within GPU_BUDGET_S seconds; <= 8 files in $(OUT), summary.txt first.
# Without a GPU it is a CPU rehearsal of every step at tiny sizes (tests/test_gpucheck.py runs it).
OUT ?= bench/results/gpu
GPU_BUDGET_S ?= 500
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) -m anydepth.gpucheck run --out $(OUT) --budget $(GPU_BUDGET_S) $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info anydepth_kernels/*.so anydepth_kernels/_build_info.py
