# One command each on a fresh machine: `make demo` and `make test` create .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST ?= /usr/share/datasets/fashion-mnist

.PHONY: venv demo test fmnist clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST from Debian's dataset-fashion-mnist package when it is missing and apt-get can run
fmnist:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)); \
	  else \
	    echo "Fashion-MNIST not found in $(FMNIST). Install it with 'sudo apt-get install dataset-fashion-mnist'"; \
	    echo "or put the four *-idx?-ubyte.gz files of the Fashion-MNIST release in a folder and run"; \
	    echo "'make demo FMNIST=/that/folder'."; exit 1; \
	  fi; \
	fi

demo: venv fmnist
	$(PY) tools/demo.py --out demo_output --src $(FMNIST)

$(VENV)/.test-installed: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

test: venv $(VENV)/.test-installed
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q

clean:
	rm -rf demo_output output
