# Mini-Claude: every target sets up what it needs first (a .venv in the repo).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: setup setup-dev setup-llamacpp browser chat serve web train bench test test-slow test-all lint format cov download \
	clean-cache docs-images load-test soak export-preferences dpo

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

setup-llamacpp: setup            ## optional: llama-cpp-python for the benchmark's llama.cpp row (~10 min build)
	@# This CPU's instruction sets, AMX off (see src/benchmarks/llama_cpp.py); no cached wheel,
	@# which may have been built natively.
	CMAKE_ARGS="$$($(PY) -m src.benchmarks.llama_cpp --cmake-args)" \
	  $(PY) -m pip install --quiet --no-cache-dir --force-reinstall --no-deps -r requirements-llamacpp.txt
	$(PY) -m pip install --quiet -r requirements-llamacpp.txt

browser:                         ## headless Chromium + driver for the UI test (Debian packages)
	@command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium chromium-driver >/dev/null; \
	  else \
	    echo "note: install chromium and chromium-driver (sudo apt-get install chromium" \
	         "chromium-driver) to run the browser test; it is skipped without them."; \
	  fi; }

chat: setup                      ## set up and start the CLI chatbot
	$(PY) src/mvp_chatbot.py $(ARGS)

serve: setup                     ## set up and start the API (UI at /ui) on API_HOST:API_PORT
	$(PY) -m src.web

web: setup                       ## set up and start the Gradio UI alone (port 7860)
	$(PY) src/web_app.py $(ARGS)

train: setup                     ## LoRA fine-tuning (configs/lora_default.yaml; ARGS=--resume ...)
	$(PY) src/training/train_lora.py --config configs/lora_default.yaml $(ARGS)

bench: setup                     ## side-by-side benchmark -> outputs/benchmark/benchmark.{json,md,png}
	$(PY) scripts/benchmark.py $(ARGS)

load-test: setup                 ## load-test the API (loopback): clients, disconnects, latency, memory
	$(PY) scripts/load_test.py $(ARGS)

soak: setup                      ## one-hour soak: every route, adapters, a SIGKILL and a SIGTERM, memory
	$(PY) scripts/load_test.py --clients 16 --duration 3600 --adapters 3 --sigkill-at 120 \
	  --sigterm-at 300 --turns 12 --max-new-tokens 48 --sample-seconds 30 \
	  --output outputs/soak/load.json $(ARGS)

download: setup                  ## fetch/prepare MODEL_NAME into MODEL_CACHE_DIR
	$(PY) scripts/download_models.py $(ARGS)

clean-cache: setup               ## list the model cache (ARGS=--yes deletes)
	$(PY) scripts/clean_cache.py $(ARGS)

dpo: setup                      ## preference-tune a LoRA adapter with DPO (configs/dpo_default.yaml; ARGS="KEY=VALUE ...")
	$(PY) src/training/train_dpo.py --config configs/dpo_default.yaml $(ARGS)

export-preferences: setup       ## feedback -> preference pairs (DATA_DIR/preferences.jsonl)
	$(PY) scripts/export_preferences.py $(ARGS)

test: setup-dev browser          ## set up and run the test suite (not the slow tests)
	$(PY) -m pytest $(ARGS)

test-slow: setup-dev browser            ## only the slow tests
	$(PY) -m pytest -m slow $(ARGS)

test-all: setup-dev browser             ## every test
	$(PY) -m pytest -m "slow or not slow" $(ARGS)

lint: setup-dev                  ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup-dev                ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

cov: setup-dev browser                  ## tests with coverage (HTML in htmlcov/)
	$(PY) -m pytest --cov=src --cov-report=term-missing --cov-report=html $(ARGS)

docs-images: setup-dev browser   ## refresh the README's screenshot from the browser test
	UPDATE_DOCS_IMAGES=1 $(PY) -m pytest tests/integration/test_web_ui.py -q
