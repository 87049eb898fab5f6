# One command to set up and serve, one to test (see README.md). CI runs both (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
MODELS ?= models
DATA   ?= data
PORT   ?= 50051
RECIPES ?= whole_and_regions,gem

.PHONY: setup models serve test lint clean

$(BIN)/inserve: pyproject.toml setup.py protos/inserve/v1/inserve.proto
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[export,test,bench]'
	touch $@

setup: $(BIN)/inserve

$(MODELS)/efficientnet_lite0/manifest.json: | $(BIN)/inserve
	$(BIN)/inserve export --backbone efficientnet_lite0 --out $(MODELS)

models: $(MODELS)/efficientnet_lite0/manifest.json

serve: models
	$(BIN)/inserve serve --data-dir $(DATA) --models $(MODELS) --port $(PORT) --recipe $(RECIPES)

test: setup
	$(BIN)/ruff check export engines server clients tests bench
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(MODELS) build *.egg-info
