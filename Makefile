# edgepipe: set-up, tests, demo, benchmarks. Everything a fresh machine needs is done here.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch: a CPU build from local disk by default; `make TORCH= test` keeps whatever is installed
# (e.g. the JetPack wheel), `make TORCH='torch==2.1.0' ...` picks another.
TORCH ?= torch==2.13.0
# Two test processes, each taking whole files (a file's shared daemon starts once): most tests
# wait on sockets and child processes, so two keep a 2-core machine busy. `PYTEST_JOBS=0` runs
# the suite in one process.
PYTEST_JOBS ?= 2
PYTEST_ARGS ?=

# Debian packages the test suite drives for real (RTSP server, GStreamer, Prometheus, Chromium,
# libzmq for the C example, systemd-analyze, the MQTT and NATS brokers, openssl for test certificates).
DEB_PACKAGES := prometheus gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
	gstreamer1.0-plugins-ugly gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 gir1.2-gstreamer-1.0 \
	python3-gi chromium chromium-driver libzmq3-dev pkg-config gcc systemd mosquitto nats-server openssl
# One command per package that proves it is there (package name:command or path).
DEB_CHECKS := prometheus:/usr/bin/prometheus gstreamer1.0-tools:/usr/bin/gst-launch-1.0 \
	gir1.2-gst-rtsp-server-1.0:/usr/lib/x86_64-linux-gnu/girepository-1.0/GstRtspServer-1.0.typelib \
	chromium:/usr/bin/chromium chromium-driver:/usr/bin/chromedriver libzmq3-dev:/usr/include/zmq.h \
	systemd:/usr/bin/systemd-analyze gstreamer1.0-plugins-ugly:/usr/lib/x86_64-linux-gnu/gstreamer-1.0/libgstx264.so \
	gstreamer1.0-rtsp:/usr/lib/x86_64-linux-gnu/gstreamer-1.0/libgstrtsp.so gcc:/usr/bin/gcc \
	mosquitto:/usr/sbin/mosquitto nats-server:/usr/sbin/nats-server openssl:/usr/bin/openssl

.PHONY: help venv install deps test demo bench bench-smoke lint soak clean

help:
	@echo "make demo   - set up .venv and run the demo pipeline"
	@echo "make test   - set up everything the tests need and run them"
	@echo "make bench  - benchmarks (numbers go to benchmarks/README.md)"
	@echo "make lint   - ruff and mypy on edgepipe/ and plugins/"
	@echo "make soak   - the 10-minute soak test"

# What `make demo` installs: the runtime dependencies and onnxruntime, the fast CPU backend the
# demo's detector picks. `make install`/`make test` add the test and lint tools on top.
DEMO_EXTRAS := onnxruntime
TEST_EXTRAS := onnxruntime,test,lint
# pip's own output (progress, build backend notes) goes here; it is shown only when a step fails.
INSTALL_LOG := $(VENV)/install.log

# $(call logged,message,command): one line saying what happens, the command's output in
# $(INSTALL_LOG), and the end of that log if it fails. (No commas in the message.)
define logged
	@echo "$(1)"
	@$(2) >>$(INSTALL_LOG) 2>&1 || { echo "Failed: $(1) The end of $(INSTALL_LOG):"; \
		tail -n 30 $(INSTALL_LOG); exit 1; }
endef

$(VENV)/bin/python:
	@echo "Creating the virtual environment $(VENV) ..."
	@$(PYTHON) -m venv $(VENV)
	$(call logged,Upgrading pip ...,$(PIP) install -q --upgrade pip)

$(VENV)/.stamp-torch: | $(VENV)/bin/python
	@if [ -n "$(TORCH)" ]; then \
		echo "Installing $(TORCH) (the largest download; the first time takes a few minutes) ..."; \
		$(PIP) install -q "$(TORCH)" >>$(INSTALL_LOG) 2>&1 || { echo "Failed: installing $(TORCH). The end of $(INSTALL_LOG):"; \
			tail -n 30 $(INSTALL_LOG); exit 1; }; \
		echo "  torch $$($(PY) -c 'from importlib.metadata import version; print(version("torch"))')"; \
	fi
	@touch $@

# Reinstalled whenever the packaging changes (entry points live in the installed metadata).
$(VENV)/.stamp-demo: $(VENV)/.stamp-torch pyproject.toml setup.py
	$(call logged,Installing edgepipe and its dependencies (with onnxruntime) ...,$(PIP) install -q -e '.[$(DEMO_EXTRAS)]')
	@touch $@

# The full set is a superset of the demo's, so it brings the demo stamp up to date as well.
$(VENV)/.stamp-install: $(VENV)/.stamp-torch pyproject.toml setup.py
	$(call logged,Installing edgepipe and its dependencies with the test and lint tools ...,$(PIP) install -q -e '.[$(TEST_EXTRAS)]')
	@touch $@ $(VENV)/.stamp-demo

venv install: $(VENV)/.stamp-install

deps:
	@missing=""; for pc in $(DEB_CHECKS); do pkg=$${pc%%:*}; f=$${pc#*:}; \
		[ -e "$$f" ] || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "Installing Debian packages:$$missing"; \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEB_PACKAGES); \
		else \
			echo "The tests need Debian packages:$$missing"; \
			echo "Run: sudo apt-get update && sudo apt-get install -y $(DEB_PACKAGES)"; exit 1; \
		fi; \
	fi

test: install deps
	$(PY) -m pytest -q $(if $(filter-out 0,$(PYTEST_JOBS)),-n $(PYTEST_JOBS) --dist loadfile) $(PYTEST_ARGS)

# One minute of generated scenes through the shipped demo model (configs/demo.yaml); it ends by
# itself with a summary. The variables its header lists pass through (EDGEPIPE_DEMO_FRAMES=...).
demo: $(VENV)/.stamp-demo
	@mkdir -p "$${EDGEPIPE_DEMO_DIR:-demo-output}"
	@echo "Starting the demo; where to look (preview page, detections, files) follows once it is ready."
	$(VENV)/bin/edgepipe run configs/demo.yaml

bench: install
	$(PY) -m benchmarks.run

bench-smoke: install
	$(PY) -m benchmarks.run --smoke

soak: install deps
	$(PY) -m pytest -q -m soak tests

lint: install
	$(VENV)/bin/ruff check edgepipe plugins
	$(VENV)/bin/mypy edgepipe plugins

clean:
	rm -rf $(VENV) build dist *.egg-info
