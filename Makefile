# `make demo` and `make test` set everything up on a fresh machine: gfortran (escnn's py3nj needs
# it), a virtual env in .venv, torch from this machine's disk, then eqzoo itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench clean

$(STAMP): pyproject.toml
	@command -v gfortran >/dev/null || { apt-get update -qq && apt-get install -y -qq gfortran; }
	@# a new venv: torch's CUDA build fills about 6 GB, so say so now rather than fail mid-install with ENOSPC
	@test -x $(PY) || { free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); \
	  if [ "$$free_kb" -lt 6500000 ]; then \
	    echo "eqzoo: the virtual env needs about 6.5 GB free in $$PWD, only $$((free_kb / 1024)) MB are free" >&2; exit 1; \
	  fi; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	# torch first, pinned, so that pip takes the local build instead of a multi-GB download
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) scripts/bench.py layers

clean:
	rm -rf $(VENV)
