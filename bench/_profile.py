"""Optional py-spy sampling of the proxy processes while a workload runs (``--py-spy``)."""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

__all__ = ["py_spy", "top_frames"]


@contextlib.contextmanager
def py_spy(pids: Mapping[str, int], directory: Path, label: str) -> Iterator[dict[str, Path]]:
    """Sample each process with ``py-spy record --nonblocking`` (folded stacks) meanwhile.

    Non-blocking: py-spy never stops the process, so the figures are not disturbed (blocking
    mode stops the process at syscall boundaries, which over-weights cheap syscalls).
    """
    binary = shutil.which("py-spy")
    if binary is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    directory.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, Path] = {}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for name, pid in pids.items():
            out = directory / f"{label}-{re.sub(r'[^A-Za-z0-9.-]+', '_', name)}.folded"
            command = [binary, "record", "--pid", str(pid), "--nonblocking", "--rate", "250"]
            command += ["--format", "raw", "--output", str(out)]
            processes.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
            outputs[name] = out
        yield outputs
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def top_frames(folded: Path, count: int = 8) -> list[tuple[float, str]]:
    """The functions with the most self samples: [(share, "function (file)")]."""
    self_samples: collections.Counter[str] = collections.Counter()
    total = 0
    if not folded.exists():
        return []
    for line in folded.read_text(errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        leaf = re.sub(r":\d+\)$", ")", stack.rsplit(";", 1)[-1])
        self_samples[leaf] += int(number)
        total += int(number)
    return [(n / total, frame) for frame, n in self_samples.most_common(count)] if total else []
