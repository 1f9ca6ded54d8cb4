"""Regenerate the parts of the documentation that are written from the code.

    .venv/bin/python scripts/docs.py           # rewrite docs/configuration.md
    .venv/bin/python scripts/docs.py --check   # exit 1 if it is out of date

The configuration reference (one table per TOML table) comes from the settings classes of
src/shanoir_dicomweb_proxy/_config.py: types, defaults and required keys from the dataclasses,
the meaning of each key from the ``#:`` comment above its field. Only the text between the
markers is rewritten; the prose around it is kept. tests/test_docs.py fails while the committed
file differs from what this script writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shanoir_dicomweb_proxy._config_reference import config_reference, replace_generated

DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether it is current")
    args = parser.parse_args()
    current = DOCUMENT.read_text(encoding="utf-8")
    try:
        wanted = replace_generated(current, config_reference())
    except ValueError as exc:
        print(f"error: {DOCUMENT}: {exc}", file=sys.stderr)
        return 2
    if wanted == current:
        print(f"{DOCUMENT}: up to date")
        return 0
    if args.check:
        print(f"{DOCUMENT}: out of date; run scripts/docs.py", file=sys.stderr)
        return 1
    DOCUMENT.write_text(wanted, encoding="utf-8")
    print(f"{DOCUMENT}: rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
