# make align   aligns a small real sample (or INPUT=... OUTPUT=...)
# make test    runs the whole suite
# make gpu-bundle  prepares .device/ for bench/gpu.sh, the GPU machine's one-call benchmark
# make bench   measures photos/s against facenet's original loop (DATA=... picks the folder;
#              ENGINE=dask also runs the dask engine on a LocalCluster, beside the local one;
#              BENCH_ARGS=--arcface times --align arcface beside box mode)
# Each makes its own virtualenv (.venv) and installs what it needs.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SAMPLE := sample
INPUT  ?= $(SAMPLE)
OUTPUT ?= $(SAMPLE)_aligned
DATA   ?= $(SAMPLE)
ENGINE ?= local
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: align test bench weights venv clean gpu-bundle

venv: $(VENV)/.installed
$(VENV)/.installed: setup.cfg pyproject.toml setup.py align/_native.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,backends]'
	# the reference implementation, for parity tests and benchmarks only (its declared
	# dependencies are TF1-era; what it needs to run is in the test extra)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps facenet==1.0.5
	touch $@

weights: venv
	@$(PY) -m facenet_nets.weights >/dev/null

SAMPLE_STAMP := .cache/sample.complete
$(SAMPLE_STAMP): data/samples.py | venv
	$(PY) data/samples.py $(SAMPLE)
	@mkdir -p $(@D) && touch $@

align: venv weights $(if $(filter $(SAMPLE),$(INPUT)),$(SAMPLE_STAMP))
	$(VENV)/bin/align_dataset $(INPUT) $(OUTPUT)

test: venv weights
	$(PY) -m pytest -q

bench: venv weights $(if $(filter $(SAMPLE),$(DATA)),$(SAMPLE_STAMP))
	$(PY) bench/bench.py $(DATA) --engine $(ENGINE) $(BENCH_ARGS)

# what bench/gpu.sh needs on the GPU machine, in .device/ (carry it there)
gpu-bundle: venv weights
	bench/gpu_prepare.sh

clean:
	rm -rf $(VENV) $(SAMPLE) $(SAMPLE)_aligned $(SAMPLE_STAMP) bench/out
