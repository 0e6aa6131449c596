# Two set-up commands for a fresh machine (Python 3.11 and git are all it needs):
#   make reproduce   create .venv, install, run the pipeline at the smoke scale
#   make test        create .venv, install, run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: install reproduce test bench params ui clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 required, .venv has {sys.version.split()[0]}"'
	# torch first and exactly: a looser request would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)
	@# Meta-World renders headless through EGL or OSMesa, system libraries pip cannot install:
	@# say which one is missing now rather than when the first Meta-World env is built.
	@$(BIN)/python -c 'import mow.envs.metaworld as m; print(f"Meta-World rendering: MUJOCO_GL={m.GL_BACKEND}") if m._GL_PROBLEM is None else print(f"WARNING: {m._GL_PROBLEM} (e.g. sudo apt-get install libegl1); Meta-World runs and tests will fail")'


install: $(STAMP)

reproduce: install
	$(BIN)/snakemake --cores all

# Two pytest-xdist workers, each running whole test modules (--dist loadscope), so a
# module-scoped fixture (the SLURM cluster run, a finished training) is built once.
# (--dist loadgroup does not group anything under pytest 9: it split the cluster module
# over both workers, and each ran the 8-minute cluster pipeline.)
# --no-loadscope-reorder: hand the modules out in collection order, the longest first
# (tests/conftest.py), not xdist's default of the most tests first, which left the long
# modules of few tests to the end.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=30

bench: install
	$(BIN)/mow bench

params: install
	$(BIN)/mow params

ui: install
	@echo "MLflow UI: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf runs results/raw .snakemake
