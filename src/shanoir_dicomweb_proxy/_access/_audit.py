"""The audit log: one JSON line per access decision (DESIGN §4), written off the request path."""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import stat
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from .._headers import header
from .._logwriter import BatchedWriter
from .._request import DicomWebRequest
from .._scope import Principal, get_record
from .._types import Message, Scope, Send
from ._policy import Action

__all__ = ["AuditLog", "AuditRecord"]


class AuditRecord:
    """What the audit log says of one request, filled in as it goes."""

    def __init__(
        self, scope: Scope, principal: Principal, action: Action, request: DicomWebRequest
    ) -> None:
        self.time = time.time()
        self.observed = get_record(scope)
        if self.observed is not None:
            self.request_id = self.observed.request_id
        else:  # this layer without the observability layer around it
            supplied = header(scope, b"x-request-id")
            self.request_id = supplied.decode("latin-1")[:64] if supplied else uuid.uuid4().hex
        self.principal = principal
        self.action = action
        self.route = request.route
        self.exams: list[int] = []
        #: None until decided: the audit line says "deny", the metrics "error".
        self.decision: str | None = None
        self.status = 0
        self.bytes = 0

    def wrap(self, send: Send) -> Send:
        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
            elif message["type"] == "http.response.body":
                self.bytes += len(message.get("body", b""))
            await send(message)

        return counting

    def entry(self) -> dict[str, Any]:
        return {
            "time": datetime.fromtimestamp(self.time, UTC).isoformat(timespec="milliseconds"),
            "request_id": self.request_id,
            "subject": self.principal.subject,
            "user_id": self.principal.user_id,
            "action": self.action,
            "examinations": self.exams,
            "decision": self.decision or "deny",
            "route": self.route,
            "status": self.status,
            "bytes": self.bytes,
        }


_logger = logging.getLogger("shanoir_dicomweb_proxy.access")


class _AuditFile:
    """The audit log's file, opened at the first write and again when logrotate moved it away.

    When the proxy creates it, it is its owner's only (0600), or also readable by ``group``
    (0640), whatever the umask.
    """

    def __init__(self, path: str, *, group: int | None) -> None:
        self.path = path
        self.group = group
        self._stream: TextIO | None = None
        self._identity = (0, 0)  # device and inode of the open file

    def _open(self) -> TextIO:
        mode = 0o600 if self.group is None else 0o640
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        try:
            fd = os.open(self.path, flags | os.O_EXCL, mode)
        except FileExistsError:
            fd = os.open(self.path, flags, mode)
        else:
            os.fchmod(fd, mode)
            if self.group is not None:
                os.fchown(fd, -1, self.group)
        opened = os.fstat(fd)
        self._identity = (opened.st_dev, opened.st_ino)
        return os.fdopen(fd, "a", encoding="utf-8")

    def _current(self) -> TextIO:
        if self._stream is not None:
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                moved = True
            else:
                moved = (now.st_dev, now.st_ino) != self._identity
            if not moved:
                return self._stream
            self.close()
        self._stream = self._open()
        return self._stream

    def write(self, text: str) -> None:
        """Called by the writer thread only, with a batch of lines."""
        try:
            stream = self._current()
            stream.write(text)
            stream.flush()
        except OSError as error:  # a full disk: said, and tried again at the next batch
            _logger.error(
                "the audit log %s could not be written, %d line(s) lost: %s",
                self.path,
                text.count("\n"),
                error,
            )
            self.close()

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _line(entry: bytes) -> str:
    return entry.decode() + "\n"


class AuditLog:
    """JSON lines, one per decision, written by a thread of their own: a request only queues its
    line, and the thread writes what was queued every tenth of a second. The file is reopened
    when logrotate moves it.

    The proxy creates the file 0600, or 0640 with ``group`` (a name or a number) as its group;
    an existing file keeps its mode, with a warning at start when others may read it.
    """

    def __init__(self, path: str, *, group: str | None = None) -> None:
        self.path = path
        gid = None
        if group:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        self._file = _AuditFile(path, group=gid)
        self._writer = BatchedWriter(_line, self._file.write, name="audit-writer", start=False)

    def start(self) -> None:
        try:
            mode = stat.S_IMODE(os.stat(self.path).st_mode)
        except OSError:
            mode = 0
        if mode & 0o007:
            _logger.warning(
                "the audit log %s may be read by every user (mode %o): chmod o-rwx it",
                self.path,
                mode,
            )
        self._writer.start()

    def write(self, entry: Mapping[str, Any]) -> None:
        self._writer.put(orjson.dumps(entry))
        if not self._writer.running:
            # A host that never entered the app (no lifespan), or a request that ends after
            # close(): its lines are written all the same, not left to pile up in memory.
            self.start()

    def close(self) -> None:
        self._writer.close()  # writes what is queued
        self._file.close()
