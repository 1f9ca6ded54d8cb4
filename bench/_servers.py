"""The servers under test: proxy variants (transport and read size) and an nginx reference."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from shanoir_dicomweb_proxy.testing import ProxyServer, free_port

__all__ = [
    "MAPPING",
    "PROXY_VARIANTS",
    "NginxServer",
    "ProxyVariant",
    "start_proxy",
    "tune_env",
]

_TUNE_DIR = Path(__file__).resolve().parent / "_tune"


@dataclass(frozen=True)
class ProxyVariant:
    """One way of running the proxy: its ``[upstream] transport`` plus bench-only patches.

    ``patches`` are environment variables read by ``bench/_tune/sitecustomize.py`` in the proxy
    process (the proxy itself knows nothing about them).
    """

    name: str
    transport: str
    patches: Mapping[str, str] = field(default_factory=dict)
    note: str = ""
    mapped: bool = False  # identifiers translated through the embedded store
    engine: str = "hypercorn"  # [server] engine


PROXY_VARIANTS: dict[str, ProxyVariant] = {
    v.name: v
    for v in (
        ProxyVariant("httpx", "httpx", note="httpcore reads 64 KiB (default)"),
        ProxyVariant(
            "httpx-256k",
            "httpx",
            {"BENCH_HTTPCORE_READ_NUM_BYTES": str(256 * 1024)},
            "httpcore READ_NUM_BYTES = 256 KiB",
        ),
        ProxyVariant(
            "httpx-1m",
            "httpx",
            {"BENCH_HTTPCORE_READ_NUM_BYTES": str(1024 * 1024)},
            "httpcore READ_NUM_BYTES = 1 MiB",
        ),
        ProxyVariant("aiohttp", "aiohttp", note="the proxy's aiohttp transport, reads up to 1 MiB"),
        ProxyVariant(
            "hypercorn-h11",
            "aiohttp",
            {"BENCH_HYPERCORN_H11": "1"},
            "aiohttp, hypercorn parsing HTTP/1.1 with its own h11 instead of httptools",
        ),
        ProxyVariant(
            "mapped",
            "aiohttp",
            note="aiohttp, public UIDs translated through the embedded SQLite store",
            mapped=True,
        ),
        ProxyVariant(
            "mapped-gc-default",
            "aiohttp",
            {"BENCH_GC_DEFAULT": "1"},
            "mapped, with CPython's garbage collector settings instead of serve's",
            mapped=True,
        ),
        ProxyVariant(
            "uvicorn", "aiohttp", note="aiohttp, [server] engine = uvicorn", engine="uvicorn"
        ),
        ProxyVariant(
            "uvicorn-mapped",
            "aiohttp",
            note="uvicorn, public UIDs translated through the embedded SQLite store",
            mapped=True,
            engine="uvicorn",
        ),
    )
}


#: ``[mapping]`` of the mapped variant; bench/run.py builds public paths with the same roots.
MAPPING = {
    "backend": "sqlite",
    "study_root": "1.4.9.12.34.1.8527",
    "series_root": "1.4.9.12.34.2.8527",
}


def start_proxy(
    variant: ProxyVariant, workdir: Path, upstream_url: str, *, store: Path | None = None
) -> ProxyServer:
    """Start ``serve -c FILE`` for ``variant`` and check that its patches took effect.

    A mapped variant needs ``store``, a store synced from the upstream.
    """
    settings: dict[str, Any] = {
        "server": {"engine": variant.engine},
        "auth": {"enabled": False},
        "mapping": {"backend": "identity"},
        "access": {"backend": "allow_all"},
        "upstream": {"url": upstream_url, "transport": variant.transport},
    }
    if variant.mapped:
        assert store is not None, "a mapped proxy needs a synced store"
        settings["mapping"] = MAPPING
        settings["store"] = {"path": str(store)}
    env = tune_env(variant.patches) if variant.patches else {}
    proxy = ProxyServer(workdir / variant.name, settings, env=env)
    proxy.start()
    if variant.patches:
        log = proxy.log_path.read_text(errors="replace")
        missing = [key for key in variant.patches if f"bench-tune: {key}=" not in log]
        if missing:
            proxy.stop()
            raise RuntimeError(f"proxy variant {variant.name}: patch not applied: {missing}")
    return proxy


def tune_env(patches: Mapping[str, str]) -> dict[str, str]:
    """The environment that applies ``patches`` (``bench/_tune/sitecustomize.py``) to a proxy."""
    path = os.pathsep.join(p for p in (str(_TUNE_DIR), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, **patches}


_NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream pacs {{
        server 127.0.0.1:{upstream_port};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://pacs;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_buffer_size 64k;
            proxy_buffers 8 64k;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


class NginxServer:
    """nginx in the foreground as a plain reverse proxy in front of the PACS (no system service).

    One worker, like the proxy's one process; ``proxy_buffering off`` with 64 KiB buffers, which
    is the strong configuration for streamed answers.
    """

    def __init__(self, workdir: Path, upstream_port: int) -> None:
        self.workdir = workdir
        self.upstream_port = upstream_port
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def find() -> str | None:
        return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return self.url + "/dicom-web"

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def start(self, timeout: float = 10.0) -> None:
        binary = self.find()
        if binary is None:
            raise RuntimeError("nginx is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Workers may run as another user (nobody): let them reach their temp dirs.
        self.workdir.chmod(0o755)
        conf = self.workdir / "nginx.conf"
        tmp = self.workdir.resolve()
        conf.write_text(
            _NGINX_CONF.format(tmp=tmp, port=self.port, upstream_port=self.upstream_port)
        )
        log = (self.workdir / "stderr.log").open("ab")
        with log:
            self._process = subprocess.Popen(
                [binary, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"nginx exited:\n{self.log_tail()}")
            try:
                response = httpx.get(self.dicomweb_url + "/studies?limit=1", timeout=1)
                if response.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not come up:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        texts = []
        for name in ("stderr.log", "error.log"):
            path = self.workdir / name
            if path.exists():
                texts += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(texts)

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)  # fast shutdown: master stops its workers
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def versions() -> dict[str, str]:
    """Versions of what is measured, for the report header."""
    out = {"python": sys.version.split()[0]}
    for name in ("httpx", "httpcore", "hypercorn", "h11", "aiohttp"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
