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

# nvcc lives here on the development machines; the CUDA extension is built when it is found.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
export MAX_JOBS

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*/*.cpp csrc/*/*.cu)

.PHONY: test bench demo install gpu gpu-test gpu-bench clean

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

test: $(VENV)/.installed
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(VENV)/bin/anydepth bench $(BENCH_ARGS)

# Synthetic data -> self-distillation training (yolov12n with distillation on and off, rtdetr-r18)
# -> COCO AP at every depth; < 30 min on a 2-core CPU. Results: $(DEMO_OUT)/RESULTS.md
DEMO_OUT ?= runs/demo
DEMO_ARGS ?=
demo: $(VENV)/.installed
	$(VENV)/bin/anydepth demo --out $(DEMO_OUT) $(DEMO_ARGS)

# On a GPU machine (the device tool's machines have torch/triton/pytest preinstalled, no network):
# build against the machine's own torch, run the GPU tests and the benchmarks, results to $(OUT).
OUT ?= bench/results
gpu:
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
	$(PYTHON) -c "import anydepth_kernels, json; print(json.dumps(anydepth_kernels.extension_info(), indent=1))"
	-$(PYTHON) -m pytest tests -q -p no:cacheprovider $(PYTEST_ARGS)
	$(PYTHON) -m anydepth.cli bench --kernels --device cuda --out $(OUT)
	$(PYTHON) -m anydepth.cli bench --model yolov12s-anydepth --model rtdetr-r50-anydepth --device cuda --out $(OUT)

clean:
	rm -rf build *.egg-info anydepth_kernels/*.so anydepth_kernels/_build_info.py
