"""Observability (DESIGN §2, outermost layer): request ids, the access log, Prometheus metrics.

Inner layers note what only they know on the request's
:class:`~shanoir_dicomweb_proxy._scope.RequestRecord` (``get_record``): one attribute write,
nothing when there is no record (a stack without this layer). Nothing that names a patient is
ever recorded: no path, no query, no UID, no token; metric labels hold route kinds, status
codes and fixed words only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import sys
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, Final, Protocol, TextIO

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from ._config import Settings
from ._headers import header
from ._logwriter import BatchedWriter
from ._scope import RequestRecord, find_dicomweb_request, route_path, set_record
from ._types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "CacheCounts",
    "JsonFormatter",
    "ObservabilityMiddleware",
    "ObservedRequest",
    "configure_logging",
]

#: Metric names start with this.
PREFIX: Final = "dicomweb_proxy_"
#: Set by ``serve --workers N`` deployments: every worker writes its metrics there.
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

access_logger = logging.getLogger("shanoir_dicomweb_proxy.requests")

# RFC 9110 token characters: printable ASCII without separators, spaces or quotes.
_REQUEST_ID = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")
_PLAIN = re.compile(r"[!#$%&'*+\-./:@^_`|~0-9A-Za-z]{1,256}")
# Seconds: from a small metadata answer to a study retrieve over a slow link.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


async def _send_after_the_end(message: Message) -> None:
    raise RuntimeError("ASGI send called after the request was over")


async def _receive_after_the_end() -> Message:
    raise RuntimeError("ASGI receive called after the request was over")


class ObservedRequest(RequestRecord):
    """A :class:`RequestRecord` that counts what passes through its ``receive`` and ``send``,
    and writes itself as the access log line (``str``) or its fields (JSON lines)."""

    __slots__ = ("started", "_id_header", "_send", "_receive")

    def __init__(self, request_id: bytes, method: str, send: Send, receive: Receive) -> None:
        super().__init__(request_id.decode("ascii"), method)
        self._id_header = (b"x-request-id", request_id)
        self._send = send
        self._receive = receive
        self.started = time.perf_counter()

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.bytes_in += len(message.get("body", b""))
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            self.bytes_out += len(message.get("body", b""))
        elif kind == "http.response.start":
            self.status = message["status"]
            message["headers"] = [*message.get("headers", ()), self._id_header]
        await self._send(message)

    def release(self) -> None:
        """Let go of the server's ``send`` and ``receive`` once the request is over.

        They belong to the server's object for the request, which holds the scope, which holds
        this record: a reference cycle per request, which only the garbage collector could
        free. The collections of that garbage cost more CPU than most layers of the proxy
        (with hypercorn, 28 objects per request, whose full collections took 50 ms each)."""
        self._send = _send_after_the_end
        self._receive = _receive_after_the_end

    def fields(self) -> dict[str, Any]:
        """The access log fields, for JSON lines."""
        upstream = self.upstream_seconds
        return {
            "request_id": self.request_id,
            "method": self.method,
            "route": self.route,
            "status": self.status,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration_ms": round(self.seconds * 1000, 3),
            "upstream_ms": round(upstream * 1000, 3) if upstream else None,
            "subject": self.subject,
            "user_id": self.user_id,
            "decision": self.decision,
            "token_failure": self.token_failure,
        }

    def summary(self) -> str:
        return f"{self.method} {self.route} {self.status}"

    def __str__(self) -> str:
        """The access log line in text format: ``key=value`` pairs, ``-`` for none."""
        upstream = f"{self.upstream_seconds * 1000:.3f}" if self.upstream_seconds else "-"
        return (
            f"request_id={self.request_id} method={_plain(self.method)} route={self.route} "
            f"status={self.status} bytes_in={self.bytes_in} bytes_out={self.bytes_out} "
            f"duration_ms={self.seconds * 1000:.3f} upstream_ms={upstream} "
            f"subject={_plain(self.subject)} user_id={_plain(self.user_id)} "
            f"decision={self.decision or '-'} token_failure={self.token_failure or '-'}"
        )


def _plain(value: str | None) -> str:
    """A value as it may stand in a text line: quoted (JSON) unless plain, so that a claim
    cannot forge fields or lines."""
    if value is None:
        return "-"
    return value if _PLAIN.fullmatch(value) else orjson.dumps(value).decode()


class CacheCounts(Protocol):
    """A cache that counts its hits and misses (read at scrape time)."""

    @property
    def cache_hits(self) -> int: ...

    @property
    def cache_misses(self) -> int: ...


class _CacheCollector:
    """``cache_hits_total`` and ``cache_misses_total`` by cache, read from the caches."""

    def __init__(self, caches: Mapping[str, CacheCounts]) -> None:
        self.caches = caches

    def collect(self) -> Iterator[Metric]:
        hits = CounterMetricFamily(
            f"{PREFIX}cache_hits", "Answers found in a cache.", labels=["cache"]
        )
        misses = CounterMetricFamily(
            f"{PREFIX}cache_misses", "Answers a cache had to ask for.", labels=["cache"]
        )
        for name, cache in self.caches.items():
            hits.add_metric([name], cache.cache_hits)
            misses.add_metric([name], cache.cache_misses)
        yield hits
        yield misses


class _CacheFlusher:
    """Multiprocess mode: each worker adds its caches' new counts to shared counters, at most
    once a second (a scrape reads the files of all workers, not their memory)."""

    def __init__(self, caches: Mapping[str, CacheCounts], registry: CollectorRegistry) -> None:
        self.caches = caches
        hits = Counter(
            f"{PREFIX}cache_hits", "Answers found in a cache.", ["cache"], registry=registry
        )
        misses = Counter(
            f"{PREFIX}cache_misses", "Answers a cache had to ask for.", ["cache"], registry=registry
        )
        self._counters = {name: (hits.labels(name), misses.labels(name)) for name in caches}
        self._flushed = dict.fromkeys(caches, (0, 0))
        self.due = 0.0

    def flush(self, now: float) -> None:
        self.due = now + 1.0
        for name, cache in self.caches.items():
            counts = cache.cache_hits, cache.cache_misses
            done = self._flushed[name]
            for counter, count, before in zip(self._counters[name], counts, done, strict=True):
                if count > before:
                    counter.inc(count - before)
            self._flushed[name] = counts


class _RouteMetrics:
    """The metric children of one route kind, looked up once rather than per request."""

    __slots__ = ("route", "statuses", "bytes_in", "bytes_out", "duration", "upstream")

    def __init__(self, route: str, owner: ObservabilityMiddleware) -> None:
        self.route = route
        self.statuses: dict[int, Counter] = {}
        self.bytes_in = owner.bytes_in.labels(route)
        self.bytes_out = owner.bytes_out.labels(route)
        self.duration = owner.duration.labels(route)
        # Created on first use: most "other" requests never reach the upstream.
        self.upstream: Histogram | None = None


class ObservabilityMiddleware:
    """Request ids, one access log line per request, and Prometheus metrics (the outermost
    layer of :class:`~shanoir_dicomweb_proxy.DicomWebProxy`).

    A request keeps a client's ``X-Request-ID`` when it is a token of at most 64 characters,
    else gets a fresh one; either is answered in ``X-Request-ID`` and sent upstream. The
    access line goes to the ``shanoir_dicomweb_proxy.requests`` logger at INFO when
    ``access_log`` is set. ``metrics_path`` ("" = off) serves the metrics of ``registry`` (a
    new one by default, never the global one) in Prometheus text format, without a token; with
    ``PROMETHEUS_MULTIPROC_DIR`` set it serves the sum over every process writing there.
    ``caches`` names the caches whose hits and misses are exported.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        access_log: bool = True,
        metrics_path: str = "/metrics",
        caches: Mapping[str, CacheCounts] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.app = app
        self.access_log = access_log
        self.metrics_path = metrics_path
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}requests", "Requests answered.", ["route", "status"], registry=r
        )
        self.bytes_in = Counter(
            f"{PREFIX}request_bytes", "Request body bytes received.", ["route"], registry=r
        )
        self.bytes_out = Counter(
            f"{PREFIX}response_bytes", "Response body bytes sent.", ["route"], registry=r
        )
        self.duration = Histogram(
            f"{PREFIX}request_duration_seconds",
            "Time from the request to the end of its response.",
            ["route"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.upstream = Histogram(
            f"{PREFIX}upstream_duration_seconds",
            "Time spent on the upstream requests of a request, to the end of their bodies.",
            ["route"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            f"{PREFIX}access_decisions", "Access decisions by outcome.", ["outcome"], registry=r
        )
        self.token_failures = Counter(
            f"{PREFIX}token_failures", "Refused tokens by reason.", ["reason"], registry=r
        )
        caches = dict(caches or {})
        self._flusher: _CacheFlusher | None = None
        if self.multiprocess_dir is not None:
            self._flusher = _CacheFlusher(caches, r)
        else:
            r.register(_CacheCollector(caches))
        self._routes: dict[str, _RouteMetrics] = {}
        self._decisions: dict[str, Counter] = {}
        self._failures: dict[str, Counter] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.metrics_path and route_path(scope) == self.metrics_path:
            await self._serve_metrics(scope, send)
            return
        supplied = header(scope, b"x-request-id")
        if supplied is None or not _REQUEST_ID.fullmatch(supplied):
            # 128 random bits, as a UUID's hex, from the process's own generator: unique,
            # and a fifth of uuid4's cost (a system call each).
            supplied = b"%032x" % random.getrandbits(128)
        record = ObservedRequest(supplied, scope["method"], send, receive)
        set_record(scope, record)
        try:
            await self.app(scope, record.receive, record.send)
        finally:
            self._finish(scope, record)
            record.release()

    def _finish(self, scope: Scope, record: ObservedRequest) -> None:
        now = time.perf_counter()
        record.seconds = now - record.started
        request = find_dicomweb_request(scope)
        if request is not None:
            record.route = request.route
        metrics = self._routes.get(record.route)
        if metrics is None:
            metrics = self._routes[record.route] = _RouteMetrics(record.route, self)
        counter = metrics.statuses.get(record.status)
        if counter is None:
            counter = self.requests.labels(record.route, str(record.status))
            metrics.statuses[record.status] = counter
        counter.inc()
        if record.bytes_in:
            metrics.bytes_in.inc(record.bytes_in)
        if record.bytes_out:
            metrics.bytes_out.inc(record.bytes_out)
        metrics.duration.observe(record.seconds)
        if record.upstream_seconds:
            if metrics.upstream is None:
                metrics.upstream = self.upstream.labels(record.route)
            metrics.upstream.observe(record.upstream_seconds)
        if record.decision is not None:
            _child(self._decisions, self.decisions, record.decision).inc()
        if record.token_failure is not None:
            _child(self._failures, self.token_failures, record.token_failure).inc()
        if self._flusher is not None and now >= self._flusher.due:
            self._flusher.flush(now)
        if self.access_log and access_logger.isEnabledFor(logging.INFO):
            access_logger.info(record)

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format: this app's, or with
        ``PROMETHEUS_MULTIPROC_DIR`` set, the sum over every process writing there."""
        if self._flusher is None:
            return generate_latest(self.registry)
        self._flusher.flush(time.perf_counter())
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    async def _serve_metrics(self, scope: Scope, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            headers = [(b"allow", b"GET, HEAD"), (b"content-length", b"0")]
            await send({"type": "http.response.start", "status": 405, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        body = self.exposition()
        headers = [
            (b"content-type", CONTENT_TYPE_PLAIN_0_0_4.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )


def _child(children: dict[str, Counter], parent: Counter, label: str) -> Counter:
    child = children.get(label)
    if child is None:
        child = children[label] = parent.labels(label)
    return child


# --- logging ---------------------------------------------------------------------------------

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message``, then the
    fields of an access line, and ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.msg
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        if isinstance(msg, ObservedRequest):
            data["message"] = msg.summary()
            data.update(msg.fields())
        else:
            data["message"] = record.getMessage()
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(data, default=str).decode()


class _Handler(logging.Handler):
    """The handler :func:`configure_logging` installs (and replaces when called again).

    A record is only queued here; a :class:`BatchedWriter` thread formats and writes what is
    queued (at ``close`` too, which ``logging.shutdown`` calls at exit). So the event loop pays
    for a record and an append, not for formatting or a write, and a stderr that blocks (a pipe
    whose reader is slow) never stalls the requests.
    """

    def __init__(self, target: logging.StreamHandler[TextIO]) -> None:
        super().__init__()
        self.setFormatter(target.formatter)  # the format records are written in, for show
        self._target = target
        self._writer = BatchedWriter(self._line, self._write, name="log-writer")

    def emit(self, record: logging.LogRecord) -> None:
        self._writer.put(record)

    def _line(self, record: logging.LogRecord) -> str | None:
        target = self._target
        try:
            return target.format(record) + target.terminator
        except Exception:  # as logging.Handler.emit does: reported, the rest written
            target.handleError(record)
            return None

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # a stream closed under us
            self._target.stream.write(text)
            self._target.flush()

    def close(self) -> None:
        self._writer.close()
        super().close()


def configure_logging(settings: Settings) -> None:
    """Log to stderr at ``[logging] level``, as text or as JSON lines (``[logging] format``).

    httpx and httpcore stay at WARNING or above: they log every upstream URL at INFO, and
    upstream UIDs have no place in the proxy's log.
    """
    s = settings.logging
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(JsonFormatter() if s.format == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(_Handler(stream))
    root.setLevel(s.level.upper())
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
