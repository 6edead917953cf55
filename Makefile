# One command runs it (make demo), one command tests it (make test).
VENV ?= .venv
PY := $(VENV)/bin/python
BAI := $(VENV)/bin/backendai-jupyter
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-postgres lint docker images kernelspecs clean

setup: $(STAMP) docker images kernelspecs

$(STAMP): pyproject.toml
	@bash scripts/ensure-python.sh
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lab]'
	@touch $@

docker:
	@bash scripts/ensure-docker.sh

# Kernel images to build: `make setup` builds Python's; `make setup LANGS=all` (or LANGS="r bash")
# builds more. `make test` builds them all: every language is tested.
LANGS ?= python
images: $(STAMP) docker
	$(BAI) images build $(if $(filter all,$(LANGS)),,$(LANGS))

kernelspecs: $(STAMP)
	@$(BAI) kernelspecs install --sys-prefix >/dev/null
	@# Editable installs skip data files: put the extension's auto-enable file in place here.
	@install -D -m 644 jupyter-config/backendai_jupyter.json \
		$(VENV)/etc/jupyter/jupyter_server_config.d/backendai_jupyter.json

demo: setup
	@bash scripts/demo.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy backendai_jupyter/common backendai_jupyter/provisioner backendai_jupyter/agent/backends/base.py \
		backendai_jupyter/agent/launch.py backendai_jupyter/agent/accelerators

# jupyter_client 6 (ignores kernel provisioners) with a matching nbclient, for the launcher's test.
COMPAT := .venv-jc6/.installed
$(COMPAT): Makefile
	python3 -m venv .venv-jc6
	.venv-jc6/bin/python -m pip install --quiet "jupyter_client<7" "nbclient<0.6" nbformat
	@touch $@

test: LANGS = all
test: setup lint $(COMPAT)
	@bash scripts/ensure-browser.sh
	$(VENV)/bin/pytest

# The whole suite again, each test's gateways on a fresh PostgreSQL database (installed and
# started when missing, as root); the replica tests run only here.
test-postgres: LANGS = all
test-postgres: setup $(COMPAT)
	@bash scripts/ensure-browser.sh
	url=$$(bash scripts/ensure-postgres.sh) && BAI_TEST_POSTGRES=$$url $(VENV)/bin/pytest

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .mypy_cache
