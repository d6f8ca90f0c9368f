# serving-mlops: `make demo` and `make test` do all set-up on a fresh machine (python3 3.10+, make,
# access to the package index). Everything lands in .venv/ and .mlops/ (the local workspaces).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Spark and every test server stay on loopback
export SPARK_LOCAL_IP := 127.0.0.1
export PYTHONUNBUFFERED := 1

.DEFAULT_GOAL := help
.PHONY: help demo test java export clean

help: ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "serving-mlops needs Python 3.10+, found " + sys.version.split()[0] + ": set PYTHON=python3.x")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.py settings.ini
	$(BIN)/pip install --quiet --progress-bar off -e .
	@touch $@

$(VENV)/.installed-dev: $(BIN)/python setup.py settings.ini
	$(BIN)/pip install --quiet --progress-bar off -e ".[dev,databricks]"
	@touch $@ $(VENV)/.installed

java: ## check for Java 17+ (Spark 4), installing the OS package where possible
	@bash .ci/ensure-java

demo: $(VENV)/.installed java ## generate, ingest, features, train, validate, then deploy to a local serving endpoint and test it: the dev workspace
	$(BIN)/serving-mlops generate --env dev --rows 30000 --seed 42 --bad-fraction 0.01
	$(BIN)/serving-mlops ingest --env dev
	$(BIN)/serving-mlops features --env dev
	$(BIN)/serving-mlops train --env dev --trials 10
	$(BIN)/serving-mlops validate --env dev
	$(BIN)/serving-mlops deploy --env dev
	$(BIN)/serving-mlops query --env dev -c 1 -c 2 -c 3
	@echo
	@echo "Done. Where to look:"
	@echo "  .mlops/dev/landing/   the generated landing file"
	@echo "  .mlops/dev/tables/    Delta tables (catalog/schema/table); read them with deltalake, pandas or Spark"
	@echo "  .mlops/dev/online/    the online feature store (SQLite)"
	@echo "  $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.mlops/dev/mlflow/mlflow.db    runs, metrics and plots"
	@echo "  $(BIN)/serving-mlops tables --env dev    row counts and versions"
	@echo "  $(BIN)/serving-mlops endpoints --env dev serving endpoints (runtime at http://127.0.0.1:8711, log in .mlops/dev/serving/)"
	@echo "  $(BIN)/serving-mlops serve --env dev --stop   stop the serving runtime (it keeps running after the demo)"
	@echo "  $(BIN)/serving-mlops --help              every command"

test: $(VENV)/.installed-dev java ## nbdev_test (the notebooks) and pytest (CLI, processes, end to end)
	$(BIN)/nbdev_test
	$(BIN)/pytest tests --timeout 900

export: $(VENV)/.installed-dev ## notebooks -> serving_mlops/ (then nbdev_clean before committing)
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean

clean: ## remove the virtual environment and every local workspace
	rm -rf $(VENV) .mlops
