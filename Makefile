# make setup: .venv from nothing; make test: the test suite; make demo: the main job.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
DEMO   ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup system test test-fast demo clean

# Python packages only: no root, no compiler (the demo needs nothing else).
setup: $(STAMP)

# Debian packages the Slurm tests use: a real Slurm (slurm/local_cluster.sh starts it) and
# shellcheck for the rendered job scripts; g++ builds kenlm, which PyPI has only as source.
# Installed only when missing (needs root).
SYSTEM_TOOLS := sbatch slurmctld slurmd munged shellcheck g++
system:
	@missing=$$(for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || echo $$t; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing $$missing: run 'make system' as root (apt-get)" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    slurmctld slurmd slurm-client munge shellcheck g++ >/dev/null; \
	fi

# torch goes first and alone with its exact pin: anything looser pulls a multi-GB CUDA build.
$(STAMP): requirements.txt requirements-nodeps.txt
	python3 -m venv $(VENV)
	$(PIP) install --quiet "$$(grep '^torch==' requirements.txt)"
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

# kenlm (CCNet's perplexity filter in data_prep) builds from source with g++ from `system`.
KENLM_STAMP := $(VENV)/.kenlm-installed
$(KENLM_STAMP): requirements-kenlm.txt $(STAMP) | system
	$(PIP) install --quiet -r requirements-kenlm.txt
	touch $@

# The tests also need the system tools (a real Slurm, shellcheck) and kenlm.
test: setup system $(KENLM_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup system $(KENLM_STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The main job: real English text -> tokenizer -> indexed dataset -> tiny LLaMA trained with
# TP=2 + sequence parallel on 2 CPU processes -> a sample; fails unless the validation loss fell
# well below the corpus's unigram entropy. Outputs in $(DEMO).
demo: setup
	$(PY) -m llama_plugin.demo --out $(DEMO)

# Leaves runs/ alone: it holds checkpoints.
clean:
	rm -rf $(VENV) .pytest_cache
