"""The proxy as a real server process, the way users run it: ``serve -c FILE``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from ._orthanc import free_port

__all__ = ["ProxyServer", "dump_toml"]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Write nested settings (sections of scalars and lists) as TOML text."""
    scalars = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    text = ""
    if scalars:
        text += (f"[{prefix}]\n" if prefix else "") + "\n".join(scalars) + "\n\n"
    for key, value in data.items():
        if isinstance(value, Mapping):
            text += dump_toml(value, f"{prefix}.{key}" if prefix else key)
    return text


class ProxyServer:
    """Run ``python -m shanoir_dicomweb_proxy serve`` with the given settings on a free port.

    ``settings`` is the TOML content as nested dicts; ``[server] bind`` is set here.
    """

    def __init__(
        self,
        workdir: Path,
        settings: Mapping[str, Any],
        *,
        port: int | None = None,
        workers: int = 1,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        server = {**settings.get("server", {}), "bind": f"127.0.0.1:{self.port}"}
        self.settings = {**settings, "server": server}
        self.base_path: str = server.get("base_path", "/dicomweb")
        self.workers = workers
        self.env = env
        self.config_path = workdir / "proxy.toml"
        self.log_path = workdir / "proxy.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return self.url + self.base_path

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def rss(self) -> int:
        """Resident memory of the server process in bytes (Linux)."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def start(self, timeout: float = 20.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(dump_toml(self.settings))
        command = [sys.executable, "-m", "shanoir_dicomweb_proxy", "serve", "-c"]
        command += [str(self.config_path), "--workers", str(self.workers)]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(self.env or {})},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"the proxy exited:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the proxy did not come up:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def __enter__(self) -> ProxyServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
