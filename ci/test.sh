#!/usr/bin/env bash
# The test command of the README (after `pip install '.[test]'`): the test
# suite, then the linters and the layers contract (imports point down).
# pytest exits non-zero (5) when no test ran, which fails this script like
# any failing test.
set -euo pipefail
cd "$(dirname "$0")/.."
# Four pytest-xdist workers (more than the 2 cores of CI: many slow tests only wait);
# the slow tests start first (tests/conftest.py).  `-n 0` in the arguments runs it in
# one process.
python -m pytest -n 4 "$@"
ruff check .
mypy
lint-imports
