# Quick start: `make run` (the paper's GloVe baseline on MRPC) and `make test`; each sets up .venv first.
# `run` installs the package alone (what the main job needs); `test` adds the test extra (launchers,
# the official RWKV runtime, sentence-transformers, the PostgreSQL driver, Triton's interpreter).
PYTHON ?= python3
VENV ?= .venv
# On this project's machines torch==2.13.0 is a CPU build on local disk; elsewhere pip picks the
# platform's default build. Override, e.g. TORCH="torch==2.13.0 --index-url …", for another build.
TORCH ?= torch==2.13.0
SHARED_GLUE := $(wildcard ../shared/data/glue)
# With ../shared beside the checkout, run offline on its GLUE copy; otherwise load from the hub.
DATA ?= $(if $(SHARED_GLUE),data_root=$(SHARED_GLUE),)

$(VENV)/.installed-base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-base
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

.PHONY: setup setup-test run test benchmark
setup: $(VENV)/.installed-base
setup-test: $(VENV)/.installed-test

run: setup
	$(VENV)/bin/python -m framework encoder=glove pooler=mean dataset=mrpc $(DATA) $(ARGS)

test: setup-test
	$(VENV)/bin/python -m pytest -q -n auto $(ARGS)

benchmark: setup
	$(VENV)/bin/python benchmarks/glove_mrpc.py
	$(VENV)/bin/python benchmarks/sweep_wall.py all
