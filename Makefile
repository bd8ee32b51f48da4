# t2i: the two commands a new user needs are `make demo` and `make test`.
# Both install the environment on first use (`make setup`): a venv in .venv with the tested
# versions from constraints.txt. Re-running is a no-op until pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.t2i-installed

.PHONY: setup demo test test-fast clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -c "import torch, torchvision, deepspeed, diffusers, transformers, open_clip, webdataset, wandb, cleanfid; print('t2i environment ready: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| diffusers', diffusers.__version__)"
	$(BIN)/python -m tools.build_ops
	touch $(STAMP)

demo: setup
	$(BIN)/t2i demo

# The suite runs on TEST_WORKERS parallel pytest workers (pytest-xdist), whole files each, longest first;
# `python -m tools.test_times` reads the run's test-results/junit.xml (docs/testing.md).
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --junitxml=test-results/junit.xml

# The SLURM tests need a SLURM: as root on Debian/Ubuntu, tools/slurm_ci.sh installs and starts a
# two-node one (two slurmd on this host, for the 2-node job test) for the duration of the tests and stops
# it after (by PID); otherwise they skip.
test: setup
	SLURM_CI_NODES=2 bash tools/slurm_ci.sh run $(PYTEST) --durations=30

test-fast: setup
	$(PYTEST) -m "not slow"
