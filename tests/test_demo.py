"""The README's demo command must finish and its printed examples must work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shanoir_dicomweb_proxy.testing import free_port

ROOT = Path(__file__).parent.parent


def test_demo_runs_its_examples(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "scripts/demo.py"), "--once"]
    command += ["--port", str(free_port()), "--dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checked: no token gets 401; with one, the search answers" in result.stdout
    assert 'curl -s -H "Authorization: Bearer $TOKEN" \'http://127.0.0.1:' in result.stdout
    assert "export TOKEN=$(" in result.stdout
