# The two set-up commands of the README: `make demo` and `make test`.
# Both install what they need (venv, pip packages) on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	scripts/starwars-trace

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/engine.py

clean:
	rm -rf $(VENV)
