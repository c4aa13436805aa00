# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench lint kafka-start kafka-stop clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/conflux demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/pytest -m 'not kafka and not slow and not chaos and not browser' $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/pytest bench --benchmark-enable --benchmark-only $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

kafka-start:
	deploy/kafka/kafka-local start

kafka-stop:
	deploy/kafka/kafka-local stop

clean:
	rm -rf $(VENV) .cache build *.egg-info
