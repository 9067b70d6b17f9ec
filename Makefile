# make setup: .venv from nothing; make test: the test suite; make demo: the main job.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
DEMO   ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo clean

setup: $(STAMP)

# torch goes first and alone with its exact pin: anything looser pulls a multi-GB CUDA build.
$(STAMP): requirements.txt
	python3 -m venv $(VENV)
	$(PIP) install --quiet "$$(grep '^torch==' requirements.txt)"
	$(PIP) install --quiet -r requirements.txt
	touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Until the training demo lands: model facts, then a random tiny LLaMA through the
# HF -> megatron (TP=2) -> generate (PP=2) -> HF path on 2 CPU processes.
demo: setup
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(PY) -m llama_plugin.describe model=llama_7b
	$(PY) scripts/random_hf_llama.py --out $(DEMO)/hf model=tiny model.num_layers=4
	$(PY) -m llama_plugin.convert hf-to-mcore --hf $(DEMO)/hf --out $(DEMO)/mcore --tp 2
	$(PY) -m llama_plugin.generate --ckpt $(DEMO)/mcore --prompt-ids 1,5,17,300 --max-new-tokens 16 --greedy --pp 2
	$(PY) -m llama_plugin.convert mcore-to-hf --ckpt $(DEMO)/mcore --out $(DEMO)/hf_back
	@echo "demo outputs in $(DEMO)"

clean:
	rm -rf $(VENV) runs .pytest_cache
