"""A real browser for the tests: Debian's Chromium driven by Playwright, and the prebuilt OHIF 3
viewer served as static files on loopback.

Chromium is ``/usr/bin/chromium`` (``apt-get install chromium``, done by ``scripts/setup.sh``):
Playwright's own browser download is not used. OHIF is ``@ohif/app``'s ``dist/``, installed
from npm into ``tests/ohif/node_modules`` (``npm ci --prefix tests/ohif``, also by setup.sh);
:class:`ViewerSite` serves it with an ``app-config.js`` written by the test.

Screenshots go to :func:`artifacts_dir`: ``$BROWSER_ARTIFACTS`` if set, else a folder of
pytest's temporary directory.
"""

from __future__ import annotations

import json
import os
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

import pytest

CHROMIUM: Final = Path("/usr/bin/chromium")
#: No first-run screens, no background calls to Google (nothing leaves the machine), no GPU.
CHROMIUM_ARGS: Final = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
OHIF_DIR: Final = Path(__file__).resolve().parent.parent / "ohif"
OHIF_DIST: Final = OHIF_DIR / "node_modules/@ohif/app/dist"


def chromium_executable() -> str:
    """The Chromium binary, or a failure telling how to install it (never a skip)."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh (apt-get install chromium)")
    return str(CHROMIUM)


def ohif_dist() -> Path:
    """The prebuilt viewer, or a failure telling how to install it (never a skip)."""
    if not (OHIF_DIST / "index.html").is_file():
        pytest.fail(f"{OHIF_DIST} is missing: run scripts/setup.sh (npm ci --prefix tests/ohif)")
    return OHIF_DIST


def artifacts_dir(
    config: pytest.Config, tmp_path_factory: pytest.TempPathFactory, name: str
) -> Path:
    """Where tests write their screenshots: ``$BROWSER_ARTIFACTS/name``, else a folder of
    pytest's temporary directory; said on the terminal, output captured or not."""
    root = os.environ.get("BROWSER_ARTIFACTS")
    folder = Path(root).resolve() / name if root else tmp_path_factory.mktemp(name)
    folder.mkdir(parents=True, exist_ok=True)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nbrowser screenshots ({name}): {folder}")
    return folder


class _Handler(SimpleHTTPRequestHandler):
    """Static files of a single-page application: a path that is no file is the app's
    ``index.html`` (the viewer routes ``/callback``, ``/viewer``... itself); ``/app-config.js``
    is the site's own."""

    server: ViewerSite
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm"}

    def send_head(self) -> Any:
        path = self.path.split("?", 1)[0]
        if path == "/app-config.js":
            content = self.server.app_config.encode()
            self.send_response(200)
            self.send_header("content-type", "text/javascript")
            self.send_header("content-length", str(len(content)))
            self.send_header("cache-control", "no-store")
            self.end_headers()
            return _Body(content)
        if not Path(self.translate_path(path)).is_file():
            self.path = "/index.html"
        return super().send_head()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Body:
    """What ``send_head`` returns for in-memory content (``copyfile`` reads it)."""

    def __init__(self, content: bytes) -> None:
        self._content: bytes | None = content

    def read(self, size: int = -1) -> bytes:
        content, self._content = self._content or b"", None
        return content

    def close(self) -> None:
        pass


class ViewerSite(ThreadingHTTPServer):
    """A viewer's static files on ``http://127.0.0.1:PORT`` (serve it with
    ``support.loopback_http.running``); the port, so :attr:`origin`, is known at once, and
    :meth:`configure` may be called later."""

    daemon_threads = True

    def __init__(self, directory: Path) -> None:
        super().__init__(("127.0.0.1", 0), partial(_Handler, directory=str(directory)))
        self.app_config = "window.config = {};\n"

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def configure(self, config: dict[str, Any]) -> str:
        """Serve ``window.config = CONFIG`` as ``/app-config.js``; returns the script."""
        self.app_config = f"window.config = {json.dumps(config, indent=2)};\n"
        return self.app_config
