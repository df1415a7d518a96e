# Set-up and the two everyday jobs. Every target sets up what it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
RUN_DIR ?= runs/default

.PHONY: setup venv data run test bench-quick clean

setup: venv data

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

data:
	@sh scripts/get-fashion-mnist.sh "$(FMNIST_DIR)"

# The main job on the embedded default: see README.md.
run: setup
	$(VENV)/bin/anybit train --model resnet20 --width 0.5 --dataset fashion-mnist --bits 1,2,4,8,32 \
		--method emqnet --epochs 8 --train-subset 10000 --test-subset 1000 --batch-size 64 --lr 0.05 --distill none \
		--out $(RUN_DIR) --overwrite
	$(VENV)/bin/anybit eval $(RUN_DIR) --bits 1-8,32

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
