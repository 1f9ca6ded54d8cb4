"""A platform's JSON API served for real on the loopback interface, for the backends that call
one (the http identifier map, the http access policy)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, TypeVar


@dataclass
class FakePlatform:
    """What a loopback platform answers (:meth:`answer`, in subclasses), how it misbehaves, and
    what it was asked: ``requests`` holds (path, JSON body, lower-cased headers)."""

    paths: ClassVar[frozenset[str]] = frozenset()  # anything else is answered 404

    status: int = 200
    delay: float = 0.0
    raw: bytes | None = None  # answered as is, instead of the answer
    requests: list[tuple[str, dict[str, Any], dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, platform: FakePlatform) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.platform = platform

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api"


class _Handler(BaseHTTPRequestHandler):
    server: LoopbackServer

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        platform = self.server.platform
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with platform.lock:
            headers = {k.lower(): v for k, v in self.headers.items()}
            platform.requests.append((self.path, body, headers))
        if platform.delay:
            time.sleep(platform.delay)
        if self.path not in platform.paths:
            self._send(404, b"{}")
        elif platform.raw is not None:
            self._send(platform.status, platform.raw)
        else:
            self._send(platform.status, json.dumps(platform.answer(self.path, body)).encode())

    def _send(self, status: int, content: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, format: str, *args: Any) -> None:
        pass


_S = TypeVar("_S", bound=ThreadingHTTPServer)


@contextmanager
def running(server: _S) -> Iterator[_S]:
    """``server`` serving in a thread of its own until the block ends."""
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def serving(platform: FakePlatform) -> contextlib.AbstractContextManager[LoopbackServer]:
    """``platform`` served at ``server.url`` until the block ends."""
    return running(LoopbackServer(platform))


@dataclass
class WholePlatform(FakePlatform):
    """Both contracts under one URL: examinations (``studies``: ID → real study UID, and
    ``series``: acquisition ID → (examination ID, real series UID)), and ``grants``: (user ID,
    action) → examination IDs. Change them while it serves: a platform where rights change."""

    paths = frozenset(
        {"/api/studies/lookup", "/api/series/lookup", "/api/access/visible", "/api/access/allowed"}
    )

    studies: dict[int, str] = field(default_factory=dict)
    series: dict[int, tuple[int, str]] = field(default_factory=dict)
    grants: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    def answer(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if path == "/api/studies/lookup":
            by_uid = {uid: exam for exam, uid in self.studies.items()}
            found = [(by_uid[u], u) for u in body.get("uids", []) if u in by_uid]
            found += [(i, self.studies[i]) for i in body.get("ids", []) if i in self.studies]
            return {"studies": [{"id": i, "study_uid": u} for i, u in found]}
        if path == "/api/series/lookup":
            by_uid = {uid: (acq, exam) for acq, (exam, uid) in self.series.items()}
            rows = [(by_uid[u][0], by_uid[u][1], u) for u in body.get("uids", []) if u in by_uid]
            rows += [(i, *self.series[i]) for i in body.get("ids", []) if i in self.series]
            return {"series": [{"id": a, "exam_id": e, "series_uid": u} for a, e, u in rows]}
        granted = self.grants.get((str(body["user"]["id"]), body["action"]), [])
        if path == "/api/access/visible":
            return {"exam_ids": list(granted)}
        return {"exam_ids": [i for i in body["exam_ids"] if i in granted]}
