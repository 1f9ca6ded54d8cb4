#!/usr/bin/env bash
# Every check the project holds itself to: lint, format, types, the layout's import contracts
# (pyproject.toml, docs/architecture.md), deploy/ (hadolint, Kubernetes schemas offline), tests
# (after scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
$py -m ruff check src tests examples bench scripts
$py -m ruff format --check src tests examples bench scripts
$py -m mypy
.venv/bin/lint-imports --no-cache
.venv/bin/hadolint deploy/Containerfile
.venv/bin/kubernetes-validate --strict --quiet deploy/kubernetes/*.yaml
$py -m pytest "$@"
