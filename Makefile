# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTRITON_VERSION := 0.7.0

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,test]'
	# the tritonserver binary, its libraries and Triton's Python backend, for the tests of `export triton`.
	# --no-deps: the wheel's metadata pins numpy<2 for pytriton's own Python API, which is never imported;
	# only its server is run (export/triton_server.py)
	$(PY) -m pip install --quiet --no-deps nvidia-pytriton==$(PYTRITON_VERSION)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/deepliif-engine demo --out demo-output --edi

test: $(STAMP)
	$(PY) -m pytest -q

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[cpu,test,bench]'
	touch $(BENCH_STAMP)

# Micro-benchmarks (pytest-benchmark) of the tile pipeline and postprocessing, then the CPU backend bench.
bench: $(BENCH_STAMP)
	$(PY) -m pytest tests/bench --override-ini addopts= --benchmark-only -q
	$(VENV)/bin/deepliif-engine bench --backends torch,onnxruntime --batch-sizes 1,4 --tiles 4 \
		--json .bench/bench.json --plot .bench/bench.png

clean:
	rm -rf $(VENV) demo-output .demo-model .bench
