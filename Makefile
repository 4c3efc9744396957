# Set-up and entry points. `make demo` and `make test` create the venv on first use (once).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SNAKE := $(PY) -m snakemake
# Jobs start from a preload server's fork instead of a fresh interpreter (metalign/preload.py): same code, same numbers.
PRELOADED := $(PY) -m metalign.preload $(SNAKE)
STAMP := $(VENV)/.installed
DEMO_ROOT := results/demo
CORES ?= 2

.PHONY: venv demo demo-full demo-dry test bench clean-demo

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(STAMP)

# The embedded demo world end to end, then the HTML report (rebuilt only when an output is newer than it).
demo: $(STAMP)
	$(PRELOADED) --cores $(CORES) --show-failed-logs all --configfile config/demo.yaml
	@if [ ! -f $(DEMO_ROOT)/report.html ] || [ -n "$$(find $(DEMO_ROOT) -newer $(DEMO_ROOT)/report.html -type f ! -name report.html | head -n 1)" ]; then \
		$(SNAKE) --cores 1 --configfile config/demo.yaml --report $(DEMO_ROOT)/report.html; \
	fi

# Every variant of the study's grid on the demo world: 20 more variants x 2 backbones, short runs, every benchmark.
demo-full: $(STAMP)
	$(PRELOADED) --cores $(CORES) --show-failed-logs all --configfile config/demo.yaml config/demo-full.yaml
	$(SNAKE) --cores 1 --configfile config/demo.yaml config/demo-full.yaml --report $(DEMO_ROOT)/report.html

demo-dry: $(STAMP)
	$(SNAKE) -n all --configfile config/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q -n $(CORES) --dist loadfile

bench: $(STAMP)
	$(PY) -m benchmarks

clean-demo:
	rm -rf results/demo resources/demo
