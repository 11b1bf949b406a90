#!/usr/bin/env bash
# The test command of the README (after `pip install '.[test]'`): the test
# suite, then the linters and the layers contract (imports point down).
# pytest exits non-zero (5) when no test ran, which fails this script like
# any failing test.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest "$@"
ruff check .
mypy
lint-imports
