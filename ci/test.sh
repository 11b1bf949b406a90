#!/usr/bin/env bash
# The test command of the README (after `pip install '.[test]'`): the test
# suite, then the linters and the layers contract (imports point down).
# pytest exits non-zero (5) when no test ran, which fails this script like
# any failing test.
set -euo pipefail
cd "$(dirname "$0")/.."
# Four pytest-xdist workers (more than the 2 cores of CI: many slow tests only wait).
# The slow tests come first (tests/conftest.py) and each worker is handed one test at a
# time as it frees up (--maxschedchunk 1): by default xdist deals each worker a block of
# consecutive tests at the start, which gave one worker most of the slow ones, in a row.
# `-n 0` in the arguments runs the suite in one process.
python -m pytest -n 4 --maxschedchunk 1 "$@"
ruff check .
mypy
lint-imports
