# The two commands a newcomer needs: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV := .venv
TFLITE_VENV := .venv-tflite
BIN := $(VENV)/bin
# Debian packages the tests talk to for real: the MQTT broker, openssl for test certificates, a browser.
APT_PACKAGES := mosquitto openssl chromium

.PHONY: demo test test-tflite system-deps bench train component fleet-sim schema clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# tflite-runtime is the fallback backend; it needs numpy<2, so it lives in its own environment and pins.
$(TFLITE_VENV)/.installed: pyproject.toml constraints-tflite.txt
	test -x $(TFLITE_VENV)/bin/python || $(PYTHON) -m venv $(TFLITE_VENV)
	$(TFLITE_VENV)/bin/pip install --quiet --upgrade pip
	$(TFLITE_VENV)/bin/pip install --quiet -r constraints-tflite.txt
	$(TFLITE_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing Debian packages:$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

demo: $(VENV)/.installed
	$(BIN)/edge-agent run

test: $(VENV)/.installed-test $(TFLITE_VENV)/.installed system-deps
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory test-tflite

test-tflite: $(TFLITE_VENV)/.installed
	$(TFLITE_VENV)/bin/python -m pytest -m tflite_runtime -p no:cacheprovider tests/test_runtime.py

bench: $(VENV)/.installed
	$(BIN)/edge-agent bench

# Retrain the shipped model (TensorFlow is the optional train extra; about 4 minutes on 2 cores).
train: $(VENV)/.installed
	$(BIN)/pip install --quiet -c constraints.txt -e '.[train]'
	$(BIN)/python -m models.mnist.train --out models/mnist/bundle

# Greengrass artifacts (wheel, constraints, model zip) and recipes, reproducibly, from the last commit.
component: $(VENV)/.installed
	$(BIN)/python deploy/greengrass/build.py

# DEVICES agent processes (2 fps each), one broker, a paced model rollout with CORRUPT corrupted downloads
# (make test runs a small one). `make fleet-sim DEVICES=20 CORRUPT=2`.
DEVICES ?= 100
CORRUPT ?= 3
fleet-sim: $(VENV)/.installed-test system-deps
	$(BIN)/python tests/fleet_sim.py --devices $(DEVICES) --corrupt $(CORRUPT)

schema: $(VENV)/.installed
	$(BIN)/edge-agent schema

clean:
	rm -rf $(VENV) $(TFLITE_VENV) build dist *.egg-info var
