# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_STAMP := $(VENV)/.installed-torch
# pytest workers; override with `make test PYTEST_WORKERS=1`.
PYTEST_WORKERS ?= 2

.PHONY: venv venv-torch test demo bench clean

venv: $(STAMP)

# Rebuilt whenever a requirements file or the project's metadata changes. The project itself is
# installed editable, without dependencies: requirements.txt pins them.
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PY) -m pip install -q "jax[cuda12]==$$(sed -n 's/^jax==//p' requirements.txt)"; fi
	touch $(STAMP)

venv-torch: $(TORCH_STAMP)

$(TORCH_STAMP): requirements-torch.txt $(STAMP)
	$(PY) -m pip install -q -r requirements-torch.txt
	touch $(TORCH_STAMP)

# The weight-import parity tests need the optional CPU torch: `make test` installs it.
test: $(TORCH_STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

demo: $(STAMP)
	$(PY) -m multiface_jax.demo --workdir=runs/demo

clean:
	rm -rf runs
