# Quick start: `make run` (the paper's GloVe baseline on MRPC) and `make test`; each sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
# On this project's machines torch==2.13.0 is a CPU build on local disk; elsewhere pip picks the
# platform's default build. Override, e.g. TORCH="torch==2.13.0 --index-url …", for another build.
TORCH ?= torch==2.13.0
SHARED_GLUE := $(wildcard ../shared/data/glue)
# With ../shared beside the checkout, run offline on its GLUE copy; otherwise load from the hub.
DATA ?= $(if $(SHARED_GLUE),data_root=$(SHARED_GLUE),)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

.PHONY: setup run test benchmark
setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/python -m framework encoder=glove pooler=mean dataset=mrpc $(DATA) $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q $(ARGS)

benchmark: setup
	$(VENV)/bin/python benchmarks/glove_mrpc.py
