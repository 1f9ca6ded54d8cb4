"""The README's demo command must finish and its printed examples must work."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from shanoir_dicomweb_proxy.testing import free_port

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_demo_runs_its_examples(tmp_path: Path) -> None:
    # The README's command itself (setup included, which is idempotent), stopping once checked.
    command = ["bash", str(ROOT / "scripts/demo.sh"), "--once"]
    command += ["--port", str(free_port()), "--dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "checked: ready; no token gets 401; alice's search shows her 1 study and bob's his 3"
        in (result.stdout)
    )
    assert "/readyz ; curl -s http://127.0.0.1:" in result.stdout
    for user in ("ALICE", "BOB"):
        assert f"export {user}=$(" in result.stdout
        assert f'curl -s -H "Authorization: Bearer ${user}" \'http://127.0.0.1:' in result.stdout
