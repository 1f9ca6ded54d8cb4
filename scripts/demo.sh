#!/usr/bin/env bash
# Set up, then run the demo: Orthanc with sample data and the proxy in front of it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
