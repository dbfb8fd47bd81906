# The contract: `make all` runs the embedded reproduction on a fresh machine, `make test` passes the tests.
# Both bootstrap .venv from the pinned requirements when it is missing or older than them, and do nothing otherwise.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nest-installed
PROFILE ?= embedded
SQL ?= SELECT rank, title, round(fused, 3) AS fused, round(bm25, 3) AS bm25, round(dense, 3) AS dense FROM retrievals WHERE example_id = 3 ORDER BY rank LIMIT 10

# Offline by design: nothing is fetched from a model hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: all test bench query reproduce keys clean distclean venv

all: $(STAMP)
	$(BIN)/nest all --profile $(PROFILE)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench.run

# the embedded run's headline numbers against tests/reproduction/embedded.json, each within its tolerance
reproduce: $(STAMP)
	NEST_REPRODUCE=1 $(BIN)/python -m pytest -q tests/pipeline/test_reproduction.py

# The corpus-wide passage-key store (EncodePassageKeys over every passage, PQ keys of 64 bytes), not part of `make all`:
# about 35-40 min and 72 MB on 2 CPU cores for the embedded corpus (docs/scale.md "make keys"). A run reads it with
# `nest all --set decoding.key_store=corpus --set EncodePassageKeys.compression=pq`. KEYS_SET adds overrides, e.g.
# KEYS_SET="--set ConvertCorpus.limit=300"; KEYS_ARGS adds task parameters, e.g. KEYS_ARGS="--key-precision bf16".
KEYS_SET ?=
KEYS_ARGS ?=
keys: $(STAMP)
	$(BIN)/nest run --profile $(PROFILE) --set EncodePassageKeys.compression=pq $(KEYS_SET) EncodePassageKeys --scope corpus $(KEYS_ARGS)

query: $(STAMP)
	$(BIN)/nest query "$(SQL)"

venv: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
	@touch $(STAMP)

clean:
	find artifacts -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
