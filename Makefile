# Two commands a newcomer needs: `make demo` and `make test`; `make bench` for the figures.
# Each sets up .venv itself and is fast when it already is.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,gcp,aws]'
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/pipeline demo --out demo-out --rounds 2

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two pytest workers, whole modules each (module fixtures are built once): every test
# trains and decodes on one thread, so the two cores of a CI machine both work. A failed
# run ends with the ids of its failed tests, one a line (pytest's own cache of them).
test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile --cache-clear \
	  || { $(BIN)/python tests/failed.py; exit 1; }

# Every benchmark, one after the other on a quiet machine (about 2 hours on 2 cores);
# each appends a dated section to BENCHMARKS.md and redraws its table of current figures,
# and cost.py projects them to 130M images.
bench: $(VENV)/.installed
	$(BIN)/python bench/bench_label.py --before 9e69e4b
	$(BIN)/python bench/bench_timm_label.py
	$(BIN)/python bench/bench_drive.py --before 9e69e4b
	$(BIN)/python bench/bench_device_paths.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_loader.py --repeats 5
	$(BIN)/python bench/bench_filter.py
	$(BIN)/python bench/bench_scale.py
	$(BIN)/python bench/bench_stats.py
	$(BIN)/python bench/bench_dedup.py
	rm -rf bench-out && $(BIN)/python bench/bench_demo.py --rounds 2 --keep bench-out/demo
	$(BIN)/python bench/bench_demo_folds.py --folds 5
	$(BIN)/python bench/bench_topk.py --demo bench-out/demo/seed100
	$(BIN)/python bench/cost.py

clean:
	rm -rf $(VENV) demo-out bench-out
