#!/usr/bin/env bash
# Every check the project holds itself to: lint, format, types, tests (after scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
$py -m ruff check src tests examples bench scripts
$py -m ruff format --check src tests examples bench scripts
$py -m mypy
$py -m pytest "$@"
