# `make demo` and `make test` each set up everything on a fresh Debian machine, then run.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist
RESULTS ?= results/quickstart
# The optional parts the tests cover; `make test EXTRAS=test` leaves Flower out (its tests then skip).
EXTRAS ?= test,flower

.PHONY: setup system-packages demo test portability clean

setup: $(STAMP) system-packages

# torch and torchvision are pinned here to the builds this machine holds; pyproject.toml accepts a range.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

system-packages:
	@missing=""; \
	[ -d $(FASHION_MNIST) ] || missing="$$missing dataset-fashion-mnist"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v shellcheck >/dev/null 2>&1 || missing="$$missing shellcheck"; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing; fi

demo: setup
	$(VENV)/bin/gradinv run studies/quickstart.yaml --results $(RESULTS)
	$(VENV)/bin/gradinv status $(RESULTS)
	$(VENV)/bin/gradinv report $(RESULTS) --out $(RESULTS).html

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

# The numeric tests under forced kernel paths, thread counts and seeds: the spread of each bar.
portability: setup
	$(PY) benchmarks/portability.py

clean:
	rm -rf $(VENV) out
