"""Waiting for what another thread or process does in its own time."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Return once ``predicate()`` holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def whole_lines(path: Path) -> list[str]:
    """The lines of a file another process appends to, without a last one still being written
    (none when the file is not there yet)."""
    if not path.exists():
        return []
    text = path.read_text()
    return text[: text.rfind("\n") + 1].splitlines()
