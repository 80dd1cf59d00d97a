# multidiff — every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The torch wheel to install. 2.13.0 resolves to the CPU build on this project's CI machines;
# on a CUDA machine pip takes the CUDA build of the same release. Override: make install TORCH=torch==2.14.1
TORCH  ?= torch==2.13.0
SCENE  ?= scenes/living_room.yaml
MODEL  ?=
ARGS   ?=
# pytest-xdist workers for `make test`: one per core (JOBS=0: all in one process, e.g. for pdb or a single test)
JOBS   ?= auto

.PHONY: install render test test-fast bench smoke gpu-check edit clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	# setuptools reports every editable install as a UserWarning ("Editable installation..."): informational, muted
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/python -m pip install --quiet -e ".[test,edit]"
	touch $@

render: install
	$(BIN)/multidiff render $(SCENE) $(if $(MODEL),--model $(MODEL)) $(ARGS)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(JOBS) --dist worksteal $(ARGS)

# The inner loop: everything but the tests marked slow (subprocesses, torchrun, bench, whole-CLI panoramas)
test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(JOBS) --dist worksteal -m "not slow" $(ARGS)

# The live editor (the [edit] extra) on a copy of the example scene, so the tracked one stays as it is:
#   make edit MODEL=tiny-random   (ARGS="--port 8765 --no-browser" ...)
EDIT_SCENE ?= outputs/edit/$(notdir $(SCENE))
edit: install
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/python -m pip install --quiet -e ".[edit,test]"
	@test -e $(EDIT_SCENE) || { mkdir -p $(dir $(EDIT_SCENE)) && cp $(SCENE) $(EDIT_SCENE); }
	$(BIN)/multidiff edit $(EDIT_SCENE) $(if $(MODEL),--model $(MODEL)) $(ARGS)

smoke: install
	$(BIN)/multidiff smoke $(ARGS)

bench: install
	$(BIN)/multidiff bench $(ARGS)

# Everything that needs a GPU, one table. No venv, no install: a GPU runner's system Python with torch
# and the wheels beside it (PYTHONPATH), e.g.  PYTHONPATH=/tmp/site:$$PWD make gpu-check PYTHON=python3
gpu-check:
	HF_HUB_OFFLINE=1 $(PYTHON) -m multidiff_cli.bench.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache .hypothesis
