"""Run a real Orthanc (with its DICOMweb plugin) as a disposable upstream PACS."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

from ._process import LoopbackProcess

__all__ = ["DICOMWEB_PLUGIN", "OrthancError", "OrthancServer", "find_orthanc"]

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


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        old = merged.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            merged[key] = _merge(old, value)
        else:
            merged[key] = value
    return merged


class OrthancServer(LoopbackProcess):
    """An ``Orthanc`` process with its own config, storage and log in ``workdir``.

    The port is chosen at construction (a free one unless given) and kept by :meth:`restart`,
    so URLs stay valid across restarts. ``extra_config`` is deep-merged over the defaults.
    """

    _what = "Orthanc"
    _log_name = "orthanc.log"
    _error = OrthancError

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(workdir, port)
        self._extra = dict(extra_config or {})

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def config_path(self) -> Path:
        return self.workdir / "orthanc.json"

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

    def _launch(self) -> subprocess.Popen[bytes]:
        binary = find_orthanc()
        if not DICOMWEB_PLUGIN.exists() and str(DICOMWEB_PLUGIN) in self.config["Plugins"]:
            raise OrthancError(f"the DICOMweb plugin {DICOMWEB_PLUGIN} is missing; {_INSTALL_HINT}")
        self.storage_path.mkdir(exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=2))
        return self._popen([binary, str(self.config_path)], cwd=self.workdir)

    def _ready(self) -> bool:
        try:
            # A short timeout, so that a foreign listener on our port is noticed quickly.
            response = httpx.get(f"{self.url}/system", timeout=0.5, auth=self.auth)
        except httpx.TransportError:
            return False
        # Any answer (even 401) means it is serving, unless it is another server
        # that already holds the port (ours will then exit with a bind error).
        return response.status_code != 200 or response.json().get("Name") == self.config["Name"]

    def kill(self) -> None:
        """SIGKILL Orthanc at once, to simulate a crashed upstream (:meth:`start` recovers)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        self.stop()

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
