"""The proxy as a real server process, the way users run it: ``serve -c FILE``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from ._process import LoopbackProcess, resident_memory

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


class ProxyServer(LoopbackProcess):
    """Run ``python -m shanoir_dicomweb_proxy serve`` with the given settings on a free port.

    ``settings`` is the TOML content as nested dicts; ``[server] bind`` is set here.
    ``env`` is added to the environment of the process.
    """

    _what = "the proxy"
    _log_name = "proxy.log"

    def __init__(
        self,
        workdir: Path,
        settings: Mapping[str, Any],
        *,
        port: int | None = None,
        workers: int = 1,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(workdir, port or None)
        server = {**settings.get("server", {}), "bind": f"127.0.0.1:{self.port}"}
        self.settings = {**settings, "server": server}
        self.base_path: str = server.get("base_path", "/dicomweb")
        self.workers = workers
        self.env = env
        self.config_path = self.workdir / "proxy.toml"

    @property
    def dicomweb_url(self) -> str:
        return self.url + self.base_path

    def rss(self) -> int:
        """Resident memory of the server process in bytes (Linux)."""
        return resident_memory(self.pid)

    def start(self, timeout: float = 20.0) -> None:
        """Write the config, spawn the server and wait until it answers: on ``[server]
        healthz_path``, else on ``readyz_path`` (ready or not), else on any path."""
        super().start(timeout)

    def _launch(self) -> subprocess.Popen[bytes]:
        self.config_path.write_text(dump_toml(self.settings))
        command = [sys.executable, "-m", "shanoir_dicomweb_proxy", "serve", "-c"]
        command += [str(self.config_path), "--workers", str(self.workers)]
        return self._popen(command, env=self.env)

    def _ready(self) -> bool:
        server = self.settings["server"]
        healthz = server.get("healthz_path", "/healthz")
        readyz = server.get("readyz_path", "/readyz")
        try:
            if healthz:
                return httpx.get(self.url + healthz, timeout=1).status_code == 200
            if readyz:
                response = httpx.get(self.url + readyz, timeout=5)
                return response.status_code in (200, 503) and "checks" in response.json()
            httpx.get(self.url + "/", timeout=1)  # the probes are off: any answer will do
            return True
        except (httpx.HTTPError, ValueError):
            return False
