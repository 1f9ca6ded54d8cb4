#!/usr/bin/env bash
# Every check the project holds itself to: lint, format, types, the layout's import contracts
# (pyproject.toml, docs/architecture.md), tests (after scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
$py -m ruff check src tests examples bench scripts
$py -m ruff format --check src tests examples bench scripts
$py -m mypy
.venv/bin/lint-imports --no-cache
$py -m pytest "$@"
