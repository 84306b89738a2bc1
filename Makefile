# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs moetrace, traces the default built-in model, prints the result
#   make test   creates .venv, installs moetrace with its test tools, runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build by default; set TORCH_SPEC (e.g. "torch>=2.4") for a CUDA machine.
TORCH_SPEC ?= torch==2.13.0
DEMO_ARGS ?= --variant orig-bf16 --variant q8_0-bf16 --variant q4_k_m-bf16 --plant 5:3:down

.PHONY: demo test install clean

$(VENV)/.installed: setup.cfg pyproject.toml setup.py kernels/layouts.py $(wildcard kernels/csrc/*.c kernels/csrc/ckernels.h kernels/csrc/common.h kernels/csrc/quant_kquant_qkx_body.h kernels/csrc/engine_cpu.h kernels/csrc/engine_cuda.h kernels/csrc/engine_decode.h)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,gpu]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/moetrace run $(DEMO_ARGS) --run demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=25 tests

clean:
	rm -rf $(VENV) traces/*/ *.egg-info
