"""What the test bed's servers share: a child process serving HTTP on a loopback port."""

from __future__ import annotations

import abc
import os
import socket
import subprocess
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

__all__ = ["LoopbackProcess", "free_port", "resident_memory"]


def free_port() -> int:
    """Return a TCP port that is free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class LoopbackProcess(abc.ABC):
    """A server process on ``127.0.0.1``, with its files and log in ``workdir``.

    The port is chosen at construction (a free one unless given) and kept by :meth:`restart`,
    so URLs stay valid across restarts. Subclasses spawn the process in :meth:`_launch`
    (with :meth:`_popen`) and say when it serves in :meth:`_ready`.
    """

    #: Names the server in messages ("Orthanc exited ...").
    _what: ClassVar[str]
    #: The log's file name in ``workdir``.
    _log_name: ClassVar[str]
    #: Raised when the process does not start or is not running.
    _error: ClassVar[type[Exception]] = RuntimeError
    #: Seconds between two readiness checks.
    _poll_interval: ClassVar[float] = 0.05

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self._port = port if port is not None else free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def port(self) -> int:
        """The loopback port, the same across restarts."""
        return self._port

    @property
    def url(self) -> str:
        """The server's root, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def pid(self) -> int:
        """The process id (an error when not started)."""
        if self._proc is None:
            raise self._error(f"{self._what} is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        """The process's stdout and stderr."""
        return self.workdir / self._log_name

    @abc.abstractmethod
    def _launch(self) -> subprocess.Popen[bytes]:
        """Write what the process needs in ``workdir`` and spawn it."""

    @abc.abstractmethod
    def _ready(self) -> bool:
        """Whether the process serves (and is ours, not another server on the port)."""

    def _popen(
        self,
        command: Sequence[str],
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        log_mode: Literal["ab", "wb"] = "ab",
    ) -> subprocess.Popen[bytes]:
        """Spawn ``command`` with ``env`` added to ours, its output going to :attr:`log_path`."""
        # The child keeps its own descriptor of the log.
        with self.log_path.open(log_mode) as log:
            return subprocess.Popen(
                command,
                cwd=cwd,
                env=None if env is None else {**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def start(self, timeout: float = 30.0) -> None:
        """Spawn the process unless it runs, and wait until it serves (else stop it)."""
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._proc = self._launch()
        # Never leave an orphan process behind, even if stop() is forgotten.
        self._finalizer = weakref.finalize(self, _terminate, self._proc, 5.0)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise self._error(
                    f"{self._what} exited with code {self._proc.returncode} during startup\n"
                    + self.log_tail()
                )
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise self._error(
                    f"{self._what} was not ready on {self.url} within {timeout:.0f} s\n"
                    + self.log_tail()
                )
            time.sleep(self._poll_interval)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process (SIGKILL after ``timeout``); idempotent."""
        if self._proc is not None:
            _terminate(self._proc, timeout)
            self._proc = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def restart(self, timeout: float = 30.0) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start(timeout)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"(no log at {self.log_path})"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self._proc.pid}" if self._proc is not None else "stopped"
        return f"<{type(self).__name__} {self.url} {state} workdir={self.workdir}>"


def resident_memory(pid: int) -> int:
    """The resident memory (RSS) of process ``pid`` in bytes, from ``/proc`` (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
