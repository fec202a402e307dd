# The two commands of the README. Each makes .venv on first use.
PY := .venv/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test bench

.venv/ok: requirements.txt requirements-test.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements-test.txt
	touch $@

demo: .venv/ok
	$(PY) launch.py --config configs/demo.py --workdir $(WORKDIR) --mode demo

test: .venv/ok
	$(PY) -m pytest -q tests

bench: .venv/ok
	$(PY) benchmarks/embed_throughput.py
