# Two entry points: `make demo` (the main job) and `make test`.
PY ?= python3
# CPU machines take the local CPU wheel; GPU machines keep their own torch (TORCH_SPEC= make ...).
TORCH_SPEC ?= torch==2.13.0
# lmms-eval without its requirements (they pull torchvision); mmscene[harness] is what it needs here.
LMMS_EVAL_SPEC ?= lmms-eval==0.7.3

.PHONY: install install-harness demo test lint

install:
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e '.[test]'

demo: install
	$(PY) -m mmscene.demo

install-harness: install
	$(PY) -m pip install -q -e '.[test,harness,lora]'
	$(PY) -m pip install -q --no-deps "$(LMMS_EVAL_SPEC)"

test: install-harness
	$(PY) -m pytest -q

lint:
	ruff check . && ruff format --check .
