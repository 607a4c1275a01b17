# Every target sets itself up: the virtualenv from uv.lock, and redis-server from Debian when missing.
SHELL := /bin/bash
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := .venv
PYTHON ?= python3
UV_VERSION := 0.13.9
UV := $(or $(shell command -v uv 2>/dev/null),.tools/bin/uv)
VENV := .venv/bin
# Two test processes (pytest-xdist), a file each at a time: most tests wait on sockets and timers, so the suite
# takes about half as long on two cores. Each process starts its own Redis. PYTEST_ARGS= runs them in one.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: help install redis-bin promtool-bin browser-bin test lint typecheck format unit demo console-demo bench clean container-bin image container-test

help:
	@echo "make test    lint, type-check and run the tests (with a throwaway Redis)"
	@echo "make demo    run the worker against the CGB simulator and print a report"
	@echo "make console-demo  the demo, then the operations console over its data until Ctrl-C"
	@echo "make bench   run the benchmarks and write BENCHMARKS.md"
	@echo "make format  format the code with ruff"
	@echo "make image   build the container image (docker or podman; a stand-in base where no registry is reachable)"
	@echo "make container-test  build the image and test it running (podman and runc from Debian when missing)"

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/pip install -q "uv==$(UV_VERSION)"

.venv/.synced: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen --python $(PYTHON)
	@touch $@

install: .venv/.synced

redis-bin:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "redis-server is missing and installing it needs root: run 'sudo apt-get install redis-server'" >&2; exit 1; fi; \
	  command -v apt-get >/dev/null || { echo "redis-server is missing and there is no apt-get: install Redis 6.2+ yourself" >&2; exit 1; }; \
	  echo "installing redis-server from Debian's packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null \
	    || { echo "apt-get could not install redis-server" >&2; exit 1; }; }

# promtool checks and unit-tests deploy/prometheus/alerts.yml (tests/test_deploy.py); Debian ships it in prometheus.
promtool-bin:
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "promtool is missing and installing it needs root: run 'sudo apt-get install prometheus'" >&2; exit 1; fi; \
	  command -v apt-get >/dev/null || { echo "promtool is missing and there is no apt-get: install Prometheus's promtool yourself" >&2; exit 1; }; \
	  echo "installing promtool (Debian's prometheus package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
	    || { echo "apt-get could not install prometheus" >&2; exit 1; }; }

# Headless Chromium and its driver for the console's browser test (tests/test_console_browser.py), from Debian.
browser-bin:
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || { \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "chromium or chromedriver is missing and installing needs root: run 'sudo apt-get install chromium chromium-driver'" >&2; exit 1; fi; \
	  command -v apt-get >/dev/null || { echo "chromium is missing and there is no apt-get: install Chromium and its chromedriver yourself" >&2; exit 1; }; \
	  echo "installing chromium and chromium-driver from Debian's packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null \
	    || { echo "apt-get could not install chromium" >&2; exit 1; }; }

lint: install
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/hadolint Dockerfile

typecheck: install
	$(VENV)/mypy

format: install
	$(VENV)/ruff format .
	$(VENV)/ruff check --fix .

# The tests start their own Redis on a free port (tests/conftest.py) and stop it when they end.
demo: install redis-bin
	$(VENV)/python -m cgb_worker.demo

# The demo, then the operations console over its data on 127.0.0.1 until Ctrl-C.
console-demo: install redis-bin
	$(VENV)/python -m cgb_worker.demo --console

# Writes BENCHMARKS.md (five to eleven minutes, as busy as the machine is; it should be otherwise idle).
bench: install redis-bin
	$(VENV)/python -m benchmarks.run

unit: install redis-bin promtool-bin browser-bin
	$(VENV)/coverage erase
	$(VENV)/coverage run -m pytest $(PYTEST_ARGS)
	$(VENV)/coverage combine -q
	$(VENV)/coverage report

test: lint typecheck unit

# The container engine: a working Docker engine if there is one, else podman with runc (and debootstrap, for
# the stand-in base), installed from Debian's packages when missing, as redis-bin does for Redis.
container-bin:
	@docker info >/dev/null 2>&1 || { \
	  missing=""; for c in podman runc debootstrap; do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	  [ -z "$$missing" ] || { \
	    if [ "$$(id -u)" != 0 ]; then \
	      echo "$$missing missing and installing needs root: run 'sudo apt-get install podman runc debootstrap'" >&2; exit 1; fi; \
	    echo "installing$$missing from Debian's packages"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null \
	      || { echo "apt-get could not install$$missing" >&2; exit 1; }; }; }

image: container-bin
	./container/image.sh

# Runs the image's containers against a throwaway Redis and the simulator on the host network (container/).
container-test: install redis-bin image
	$(VENV)/pytest container -p no:cacheprovider
	@./container/image.sh --sizes

clean:
	rm -rf .venv .tools .mypy_cache .pytest_cache .ruff_cache .coverage .coverage.*
