# The two commands of the README (and the quick test tier). Each makes .venv
# on first use.
PY := .venv/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test test-fast bench

.venv/ok: requirements.txt requirements-test.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements-test.txt
	touch $@

demo: .venv/ok
	$(PY) launch.py --config configs/demo.py --workdir $(WORKDIR) --mode demo

test: .venv/ok
	$(PY) -m pytest -q tests

# Everything but the tests marked slow (processes, training runs).
test-fast: .venv/ok
	$(PY) -m pytest -q -m "not slow" tests

bench: .venv/ok
	$(PY) -m benchmarks.suite
