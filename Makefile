# tracewire — `make demo`, `make test`, `make bench` are the whole set-up on a
# fresh Debian machine with Python 3.11: each builds .venv and installs what it needs.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEBS   := babeltrace2 python3-bt2 iproute2 nftables ethtool iputils-ping docker-compose
# What building the tracer's C path (tracewire/_speedups.c) takes; without
# them the install goes on and the tracer runs in pure Python.
BUILD_DEBS := gcc python3-dev

# $(call apt_install,PACKAGES): install the missing ones (as root), or say
# which are missing.
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: not root, cannot install$$missing; $(2)"; fi; \
	fi
endef

.PHONY: demo test lint bench fuzz venv debs clean compose compose-check

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py tracewire/_speedups.c
	$(call apt_install,$(BUILD_DEBS),the tracer will run without its C path)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# editable "compat" mode: a plain path entry in a .pth, not setuptools'
	# import-hook finder, whose own imports (pathlib, importlib.util, ...)
	# cost every process ~13 ms of start-up, `tracewire stop` included.
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

# Debian packages the tests and the demo use (babeltrace2 reads what we write).
debs:
	$(call apt_install,$(DEBS),tests needing them will skip)

demo: venv debs
	@bash scripts/demo.sh

test: venv debs lint
	$(PY) -m pytest -q -p no:cacheprovider

# ruff on the whole tree; mypy --strict on the package (pyproject.toml says which).
lint: venv
	$(VENV)/bin/ruff check --quiet .
	$(PY) -m mypy

bench: venv debs
	$(PY) bench/run.py

# The property tests over every decoder (wire frames and CBOR headers, CTF
# reader, ring-buffer control words) with 50x the examples of `make test`.
fuzz: venv
	TRACEWIRE_FUZZ_SCALE=$${TRACEWIRE_FUZZ_SCALE:-50} $(PY) -m pytest -q -p no:cacheprovider \
	  tests/test_wire.py tests/test_ctf.py tests/test_ringbuf.py tests/test_tracer.py

clean:
	rm -rf $(VENV) build *.egg-info tracewire/_speedups*.so

# The docker-compose file is generated from tracewire/topology.py, the one
# description of the multi-host topology (the netns test harness uses it too).
compose: venv
	$(PY) -m tracewire.topology compose > compose/docker-compose.yml

compose-check:
	docker-compose -f compose/docker-compose.yml config -q
