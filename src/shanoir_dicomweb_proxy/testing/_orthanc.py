"""Run a real Orthanc (with its DICOMweb plugin) as a disposable upstream PACS."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import httpx

__all__ = ["DICOMWEB_PLUGIN", "OrthancError", "OrthancServer", "find_orthanc", "free_port"]

#: Where Debian's ``orthanc-dicomweb`` package puts the plugin.
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
_INSTALL_HINT = "install it with `apt-get install orthanc orthanc-dicomweb`"


class OrthancError(RuntimeError):
    """Orthanc is missing, did not start, or refused an upload."""


def find_orthanc() -> str:
    """Return the path of the ``Orthanc`` binary (``PATH`` first, then ``/usr/sbin``)."""
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise OrthancError(f"the Orthanc binary was not found; {_INSTALL_HINT}")
    return found


def free_port() -> int:
    """Return a TCP port that is free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        old = merged.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            merged[key] = _merge(old, value)
        else:
            merged[key] = value
    return merged


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class OrthancServer:
    """An ``Orthanc`` process with its own config, storage and log in ``workdir``.

    The port is chosen at construction (a free one unless given) and kept by :meth:`restart`,
    so URLs stay valid across restarts. ``extra_config`` is deep-merged over the defaults.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self._port = port if port is not None else free_port()
        self._extra = dict(extra_config or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise OrthancError("Orthanc is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def config_path(self) -> Path:
        return self.workdir / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    @property
    def storage_path(self) -> Path:
        return self.workdir / "storage"

    @property
    def auth(self) -> tuple[str, str] | None:
        """The first registered user, when authentication is on (used by :meth:`load`)."""
        users = self.config.get("RegisteredUsers") or {}
        if not self.config.get("AuthenticationEnabled") or not users:
            return None
        user, password = next(iter(users.items()))
        return str(user), str(password)

    @property
    def config(self) -> dict[str, Any]:
        """The effective Orthanc configuration (defaults with ``extra_config`` merged over)."""
        defaults: dict[str, Any] = {
            "Name": f"test-upstream-{self._port}",
            "HttpPort": self._port,
            "StorageDirectory": str(self.storage_path),
            "IndexDirectory": str(self.storage_path),
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": "RegisteredUsers" in self._extra,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "OverwriteInstances": True,
            "SaveJobs": False,
        }
        return _merge(defaults, self._extra)

    def start(self, timeout: float = 30.0) -> None:
        """Write the config, spawn Orthanc and wait until its REST API answers."""
        if self.running:
            return
        binary = find_orthanc()
        if not DICOMWEB_PLUGIN.exists() and str(DICOMWEB_PLUGIN) in self.config["Plugins"]:
            raise OrthancError(f"the DICOMweb plugin {DICOMWEB_PLUGIN} is missing; {_INSTALL_HINT}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_path.mkdir(exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=2))
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [binary, str(self.config_path)],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        # Never leave an orphan Orthanc behind, even if stop() is forgotten.
        self._finalizer = weakref.finalize(self, _terminate, self._proc, 5.0)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        name = self.config["Name"]
        # A short timeout, so that a foreign listener on our port is noticed quickly.
        with httpx.Client(timeout=0.5, auth=self.auth) as client:
            while True:
                if self._proc.poll() is not None:
                    raise OrthancError(
                        f"Orthanc exited with code {self._proc.returncode} during startup\n"
                        + self.log_tail()
                    )
                try:
                    response = client.get(f"{self.url}/system")
                except httpx.TransportError:
                    pass
                else:
                    # Any answer (even 401) means it is serving, unless it is another server
                    # that already holds the port (ours will then exit with a bind error).
                    if response.status_code != 200 or response.json().get("Name") == name:
                        return
                if time.monotonic() > deadline:
                    raise OrthancError(
                        f"Orthanc did not answer on {self.url} within {timeout:.0f} s\n"
                        + self.log_tail()
                    )
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after ``timeout``). Idempotent."""
        if self._proc is not None:
            _terminate(self._proc, timeout)
            self._proc = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL Orthanc at once, to simulate a crashed upstream (:meth:`start` recovers)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        self.stop()

    def restart(self, timeout: float = 30.0) -> None:
        """Stop and start again on the same port with the same storage."""
        self.stop()
        self.start(timeout)

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of Orthanc's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no Orthanc log)"
        return "\n".join(text.splitlines()[-lines:])

    def load(self, paths: Iterable[Path]) -> int:
        """Upload DICOM files through ``POST /instances``; return how many were stored."""
        count = 0
        with httpx.Client(base_url=self.url, timeout=300.0, auth=self.auth) as client:
            for path in paths:
                response = client.post(
                    "/instances",
                    content=Path(path).read_bytes(),
                    headers={"Content-Type": "application/dicom"},
                )
                if response.status_code != 200:
                    raise OrthancError(
                        f"uploading {path} failed: {response.status_code} {response.text[:500]}"
                    )
                count += 1
        return count

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
        return f"<OrthancServer {self.url} {state} workdir={self.workdir}>"
