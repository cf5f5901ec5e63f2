# The README's two commands: `make run` and `make test`. Both build .venv on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config.yaml

.PHONY: run test demo lint typecheck pytest bench clean tools

$(BIN)/hms-mgmt: pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' -e ./client
	touch $@

run: $(BIN)/hms-mgmt
	$(BIN)/hms-mgmt serve --config $(CONFIG)

# The grant-payment story: daemon, three self-registering services, a trickle of grants.
demo: $(BIN)/hms-mgmt
	@bash examples/demo.sh

# Tools the tests drive for real; installed here when missing (CI=true makes their absence fatal).
tools:
	@bash .ci/tools

test: $(BIN)/hms-mgmt tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q -n 2 --dist load

# Prints figures next to their peers; installs wrk, nginx, blackbox_exporter, etcd when missing.
# (`make test` runs each bench in its --smoke mode: tests/test_bench_smoke.py.)
bench: $(BIN)/hms-mgmt
	@bash bench/tools.sh
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.registry
	$(BIN)/python -m bench.probes
	$(BIN)/python -m bench.slo
	$(BIN)/python -m bench.workflows
	$(BIN)/python -m bench.tasks
	$(BIN)/python -m bench.page
	$(BIN)/python -m bench.overload
	$(BIN)/python -m bench.audit

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
