# The two set-up commands of the README: `make demo` and `make test`.
# Both install what they need (venv, pip packages) on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo trace test bench clean

# Debian packages the datapath, the lab and the compose tests need (installed when missing;
# needs root): docker.io is the Docker engine (tests/test_compose_docker.py starts dockerd when it
# is not running), left out when a dockerd is already installed (e.g. Docker's own docker-ce
# packages, which conflict with it); debootstrap makes the offline base image.
DEBS := nftables iproute2 docker-compose debootstrap $(if $(shell command -v dockerd),,docker.io)
SYSDEPS := $(VENV)/.sysdeps

$(SYSDEPS): Makefile
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "note: missing Debian packages:$$missing (run as root to install them)"; fi; \
	fi
	mkdir -p $(VENV) && touch $(SYSDEPS)

$(STAMP): pyproject.toml $(SYSDEPS)
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/l7gate demo starwars

trace: $(STAMP)
	scripts/starwars-trace

test: $(STAMP)
	$(PY) -m pytest

# bench/run [--quick]: speed figures against HAProxy and the direct path (root: builds a lab).
bench: $(STAMP)
	bench/run $(BENCH_ARGS)

clean:
	rm -rf $(VENV)
