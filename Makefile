# Two entry points: `make demo` (the main job) and `make test`.
PY ?= python3
# CPU machines take the local CPU wheel; GPU machines keep their own torch (TORCH_SPEC= make ...).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint

install:
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e '.[test]'

demo: install
	$(PY) -m mmscene.demo

test: install
	$(PY) -m pytest -q

lint:
	ruff check . && ruff format --check .
