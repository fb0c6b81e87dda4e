# Each target sets itself up (virtual environment, CPU torch where there is no GPU, the project, offline models).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test quickstart lint clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest tests -q --durations=15

# The whole chain on SmolLM2-135M (recipes/quickstart.yaml); the time printed leaves out the one-time setup.
quickstart: setup
	@start=$$(date +%s); $(VENV)/bin/embedforge run recipes/quickstart.yaml --run-dir runs/quickstart && \
	  echo "quickstart: done in $$(( $$(date +%s) - start )) s; report: runs/quickstart/report.html"

lint: setup
	$(VENV)/bin/ruff check embedforge tests bench

clean:
	rm -rf runs .pytest_cache
