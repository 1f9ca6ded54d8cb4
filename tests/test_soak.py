"""The soak, short (issue 19): a minute of viewer-like load through the full stack (auth,
SQLite mapping and access, real Orthanc) from 8 clients of 3 users, some hanging up, two
reading slowly. Memory and descriptors stay flat, nothing fails, nothing is cut short, and
once the load stops the proxy holds no client connection and is back to its idle descriptors.

``bench/soak.py --minutes 30`` is the long version (bench/README.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shanoir_dicomweb_proxy.testing import find_orthanc

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_minute_of_viewer_load_holds(pytestconfig: pytest.Config, tmp_path: Path) -> None:
    find_orthanc()
    cached = getattr(pytestconfig, "cache", None)  # absent with -p no:cacheprovider
    cache = cached.mkdir("bench") if cached else tmp_path / "cache"
    figures = tmp_path / "soak.json"
    command = [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "1"]
    command += ["--clients", "8", "--interval", "5", "--cache", str(cache), "--json", str(figures)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(figures.read_text())
    failed = [f"{c['name']}: {c['detail']}" for c in result["checks"] if not c["ok"]]
    assert not failed, "\n".join(failed) + "\n" + done.stdout
    assert result["hangups"] > 0, "no client hung up: the load lost its hang-ups"
    operations = result["operations"]
    for kind in ("frame", "rendered", "retrieve", "series metadata", "slow retrieve", "stow"):
        assert operations.get(kind, 0) > 0, f"no {kind} in the load: {operations}"
    assert result["statuses"].get("404", 0) == operations["denied"]
