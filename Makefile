# Each target sets itself up (virtual environment, CPU torch where there is no GPU, the project, offline models).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test quickstart lint clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest tests -q --durations=15

quickstart: setup
	$(VENV)/bin/embedforge run recipes/quickstart.yaml

lint: setup
	$(VENV)/bin/ruff check embedforge tests bench

clean:
	rm -rf runs .pytest_cache
