# The two commands: `make demo` runs the whole job on the embedded default data; `make test` runs the tests.
# Each sets up what is missing first (apt data, .venv).
VENV := .venv
DEMO_OUT ?= demo_output

.PHONY: setup demo test bench

setup:
	bash scripts/setup_env.sh

demo: setup
	$(VENV)/bin/siamese-dedup demo --output $(DEMO_OUT)

test: setup
	$(VENV)/bin/python -m pytest -q tests

# Quick benchmarks (a minute or two each); see BENCHMARKS.md for the long ones and their flags.
bench: setup
	$(VENV)/bin/python bench/bench_matching.py
	$(VENV)/bin/python bench/bench_embed.py
	$(VENV)/bin/python bench/bench_trainer.py
