"""The audit log: one JSON line per access decision (DESIGN §4), written off the request path."""

from __future__ import annotations

import grp
import logging
import logging.handlers
import os
import queue
import stat
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from .._headers import header
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


class _PrivateFileHandler(logging.handlers.WatchedFileHandler):
    """A ``WatchedFileHandler`` whose file, when it creates it (at the first line, and after
    logrotate moved the last one), is its owner's only (0600), or also readable by ``group``
    (0640), whatever the umask."""

    def __init__(self, path: str, *, group: int | None) -> None:
        self.group = group
        super().__init__(path, encoding="utf-8", delay=True)

    def _open(self) -> Any:
        mode = 0o600 if self.group is None else 0o640
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        try:
            fd = os.open(self.baseFilename, flags | os.O_EXCL, mode)
        except FileExistsError:
            fd = os.open(self.baseFilename, flags, mode)
        else:
            os.fchmod(fd, mode)
            if self.group is not None:
                os.fchown(fd, -1, self.group)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


class AuditLog:
    """JSON lines, one per decision, written by a thread of their own: a request only puts its
    line on a queue. The file is reopened when logrotate moves it (``WatchedFileHandler``).

    The proxy creates the file 0600, or 0640 with ``group`` (a name or a number) as its group;
    an existing file keeps its mode, with a warning at start when others may read it.
    """

    def __init__(self, path: str, *, group: str | None = None) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        gid = None
        if group:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        handler = _PrivateFileHandler(path, group=gid)
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._listener = logging.handlers.QueueListener(self._queue, handler)
        self._logger = logging.Logger("shanoir_dicomweb_proxy.audit")
        self._logger.addHandler(logging.handlers.QueueHandler(self._queue))
        self._logger.propagate = False
        self._handler = handler
        self._started = False

    def start(self) -> None:
        if not self._started:
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
            self._listener.start()
            self._started = True

    def write(self, entry: Mapping[str, Any]) -> None:
        self._logger.info(orjson.dumps(entry).decode())

    def close(self) -> None:
        if self._started:
            self._listener.stop()  # writes what is queued
            self._started = False
        self._handler.close()
