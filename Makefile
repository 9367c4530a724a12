# edgepipe: set-up, tests, demo, benchmarks. Everything a fresh machine needs is done here.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch: a CPU build from local disk by default; `make TORCH= test` keeps whatever is installed
# (e.g. the JetPack wheel), `make TORCH='torch==2.1.0' ...` picks another.
TORCH ?= torch==2.13.0
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

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Reinstalled whenever the packaging changes (entry points live in the installed metadata).
$(VENV)/.stamp-install: $(VENV)/bin/python pyproject.toml setup.py
	@if [ -n "$(TORCH)" ]; then $(PIP) install -q "$(TORCH)"; fi
	$(PIP) install -q -e '.[test,lint]'
	@touch $@

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
	$(PY) -m pytest -q $(PYTEST_ARGS)

# One minute of generated scenes through the shipped demo model (configs/demo.yaml); it ends by
# itself with a summary. The variables its header lists pass through (EDGEPIPE_DEMO_FRAMES=...).
demo: install
	@mkdir -p "$${EDGEPIPE_DEMO_DIR:-demo-output}"
	@echo "Live preview: http://127.0.0.1:$${EDGEPIPE_PREVIEW_PORT:-8080}/"
	@echo "Detections:   $(VENV)/bin/edgepipe subscribe $${EDGEPIPE_PUB:-tcp://127.0.0.1:5556} --topic detections/"
	@echo "Files:        $${EDGEPIPE_DEMO_DIR:-demo-output}/detections.jsonl, $${EDGEPIPE_DEMO_DIR:-demo-output}/demo.mp4"
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
