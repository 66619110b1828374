# gptj-jax developer entry points. Override the interpreter with `make test PYTHON=.venv/bin/python`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

# What `install` builds for: tpu (a TPU VM), gpu (nvidia-smi present) or cpu. Override with ACCEL=cpu etc.
ACCEL ?= $(shell if [ -e /dev/accel0 ] || [ -n "$$TPU_NAME" ]; then echo tpu; \
                 elif command -v nvidia-smi >/dev/null 2>&1; then echo gpu; else echo cpu; fi)
# Without a GPU, PyTorch is pinned first so that the `torch>=2.1` extra does not pull a multi-GB CUDA
# build. torch==2.13.0 resolves to the CPU wheel on our machines; elsewhere add e.g.
# TORCH_PIP_ARGS="--index-url <PyTorch's CPU wheel index>".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
JAX_CUDA ?= cuda12
# The extras `install` adds. tpu-aot (libtpu, for `gptj-jax plan --compile-for` and its tests) on CPU hosts;
# a TPU VM has libtpu from jax[tpu] already; on a GPU host it stays out (its jax is the CUDA one).
EXTRAS_cpu := torch,dev,tpu-aot
EXTRAS_gpu := torch,dev
EXTRAS_tpu := torch,dev
EXTRAS ?= $(EXTRAS_$(ACCEL))
# pytest-xdist workers; see docs/install.md for the measurement behind the default.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=

.PHONY: install test lint bench demo

install:
	@echo "== install for $(ACCEL) with $(PYTHON)"
ifeq ($(ACCEL),gpu)
	$(PIP) install 'jax[$(JAX_CUDA)]'
else ifeq ($(ACCEL),tpu)
	$(PIP) install 'jax[tpu]'
	$(PIP) install $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
else
	$(PIP) install $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
endif
	$(PIP) install -e '.[$(EXTRAS)]'
	$(PYTHON) -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__)"

# pytest's own exit code is make's: failures (1) and "no tests collected" (5) both fail the target.
test:
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests

lint:
	$(PYTHON) -m ruff check .

bench:
	@set -e; found=0; for f in scripts/bench_*.py; do \
	    [ -f "$$f" ] || continue; found=1; echo "== $$f"; $(PYTHON) "$$f"; done; \
	[ $$found = 1 ] || echo "bench: no scripts/bench_*.py yet"

demo:
	@if [ -f scripts/demo.py ]; then $(PYTHON) scripts/demo.py; \
	else echo "demo: scripts/demo.py does not exist yet"; fi
