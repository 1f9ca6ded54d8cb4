"""The HTTP servers ``serve`` runs (``[server] engine``): hypercorn, or uvicorn on httptools,
each on uvloop when installed (``[server] loop``), one worker or several.

Both are set up alike: HTTP/1.1 keep-alive for 75 s, no access log or forwarded-header
handling of their own (the proxy has its own), a graceful stop on SIGTERM within
``[server] shutdown_grace``. Each needed a fix to free connections its client was done with
(issue 19): hypercorn in its internals (:func:`fix_hypercorn`), uvicorn with a protocol of its
own (:class:`LingeringProtocol`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from ._app import DicomWebProxy, create_app
from ._config import Settings
from ._errors import ConfigError
from ._observability import configure_logging

__all__ = [
    "LingeringProtocol",
    "fix_hypercorn",
    "hypercorn_config",
    "run_server",
    "tune_gc",
    "uvicorn_options",
]

# Where a worker process finds the settings file (``serve --workers N``).
_CONFIG_ENV = "SHANOIR_DICOMWEB_PROXY_CONFIG"


def run_server(app: DicomWebProxy, settings: Settings, path: str, workers: int) -> int:
    """Serve ``app`` (built from the file at ``path``) until SIGTERM or SIGINT; the exit status.

    With several workers each process builds its own app from ``path``."""
    server = settings.server
    keep_heap()
    if workers == 1:
        tune_gc()  # several: each worker process builds its app and tunes its own collector
    if server.engine == "uvicorn":
        options = uvicorn_options(settings)
        if workers == 1:
            # uvicorn raises the signal that stopped it again once it is done, to end with the
            # status of the default handler (killed by SIGTERM): ours makes it a clean 0.
            for stop in (signal.SIGTERM, signal.SIGINT):
                signal.signal(stop, lambda *_: None)
            uvicorn.Server(uvicorn.Config(app, **options)).run()
            return 0
        os.environ[_CONFIG_ENV] = os.path.abspath(path)
        factory = f"{__name__}:_uvicorn_worker_app"
        setup = uvicorn.Config(factory, factory=True, workers=workers, **options)
        _Supervisor(setup, sockets=[setup.bind_socket()]).run()
        return 0
    config = hypercorn_config(settings, workers)
    fix_hypercorn()
    if workers == 1:
        from hypercorn.asyncio import serve

        with asyncio.Runner(loop_factory=_loop_factory(server.loop)) as runner:
            runner.run(serve(app, config))  # type: ignore[arg-type]
        return 0
    from hypercorn.run import run

    os.environ[_CONFIG_ENV] = os.path.abspath(path)
    config.application_path = f"{__name__}:_hypercorn_worker_app()"  # type: ignore[attr-defined]
    uvloop = _loop_factory(server.loop) is not None
    config.worker_class = "uvloop" if uvloop else "asyncio"  # type: ignore[attr-defined]
    return int(run(config))  # type: ignore[arg-type]


def hypercorn_config(settings: Settings, workers: int) -> object:
    """hypercorn's settings for ``serve``."""
    from hypercorn.config import Config

    config = Config()
    config.bind = [settings.server.bind]
    config.workers = workers
    # Hypercorn's error log goes through the root handler, in [logging] format; its access
    # log stays off: the proxy's own (shanoir_dicomweb_proxy.requests) replaces it.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.loglevel = settings.logging.level.upper()
    # Study retrieves can take minutes on a slow link; the upstream read timeout bounds them.
    config.keep_alive_timeout = 75
    # On SIGTERM (or SIGINT) hypercorn stops listening, lets requests in flight finish for this
    # long, then cuts what is left and runs the lifespan's shutdown.
    config.graceful_timeout = settings.server.shutdown_grace
    # No "server: hypercorn-h11" in every answer, as uvicorn is set up (server_header): one
    # header less to validate and write per request.
    config.include_server_header = False
    return config


def keep_heap() -> None:
    """Keep freed memory in the process (glibc): answers of hundreds of KiB were allocated by
    mmap, or from a heap trimmed back to the kernel, and faulted in again page by page for the
    next answer: 151 page faults per 512 KiB frame, a third of the proxy's CPU for it on these
    VMs (the bench tunes Orthanc's malloc for the same reason). Blocks below 64 MiB now come
    from the heap, which is given back only past 256 MiB free. No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 64 * 1024 * 1024)
    mallopt(_M_TRIM_THRESHOLD, 256 * 1024 * 1024)


def tune_gc() -> None:
    """Collect cyclic garbage less often, and never walk what the process built to start again.

    A translated answer parses thousands of short-lived objects (a series metadata of 40
    instances: ~10,000), freed by reference counting as soon as it is written. With CPython's
    defaults they set off a young collection every 700 allocations and, every few dozen
    requests, a full one that walked every object the imports made (pydicom's dictionaries
    among them): ~47 ms each, 1.55 ms of collection per metadata request in all. Once the
    startup objects are frozen and the young generation holds 10,000, it is 0.01 ms. Call it
    once the app is built."""
    gc.collect()  # what startup left as garbage is freed, not frozen with the rest
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG, middle, old)


#: Container allocations (net of frees) between two young collections (CPython's: 700).
_GC_YOUNG = 10_000

# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop for ``[server] loop`` "uvloop", or "auto" when it is installed; else None
    (asyncio's own)."""
    if loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if loop == "uvloop":
            raise ConfigError("[server] loop: uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's settings for ``serve``: HTTP/1.1 on httptools, as hypercorn is set up."""
    server = settings.server
    return {
        "host": server.host,
        "port": server.port,
        "loop": "uvloop" if _loop_factory(server.loop) else "asyncio",
        "http": f"{__name__}:LingeringProtocol",
        "lifespan": "on",
        # The proxy's own access log and forwarded-header rules ([server] forwarded_allow_ips)
        # replace uvicorn's; its log goes through the root handler, in [logging] format.
        "access_log": False,
        "log_config": None,
        "proxy_headers": False,
        "server_header": False,
        "timeout_keep_alive": 75,
        "timeout_graceful_shutdown": server.shutdown_grace,
    }


def _hypercorn_worker_app() -> DicomWebProxy:
    """The app of one hypercorn worker process (``serve --workers N``)."""
    # The main process turns SIGTERM into hypercorn's shutdown event, which lets requests in
    # flight finish; it then sends its workers SIGTERM too, which would cut them off at once.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fix_hypercorn()
    return _worker_app()


def _worker_app() -> DicomWebProxy:
    """A worker process's app, from the configuration its main process named, in a process
    tuned as ``run_server`` tunes a single one."""
    settings = Settings.from_toml(os.environ[_CONFIG_ENV])
    configure_logging(settings)
    keep_heap()
    app = create_app(settings)
    tune_gc()
    return app


#: How long a connection whose upload was answered early may go on sending before it is cut.
_LINGER_SECONDS = 30.0
#: Bytes hypercorn reads from a connection at a time (its own is 64 KiB): an upload then comes
#: in a quarter of the pieces, each of which costs an h11 event, an ASGI message and a turn of
#: every layer that reads it.
_MAX_RECV = 256 * 1024


class _Supervisor(Multiprocess):
    """uvicorn's supervisor of worker processes, which kept its copy of the listening socket
    open while its workers finished their requests after SIGTERM: new connections were
    accepted there and never answered. It closes it first, so they are refused."""

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        super().terminate_all()


#: Writes coalesced by :class:`_CoalescingTransport` go out at once past this many bytes.
_COALESCE_BYTES = 64 * 1024


class _CoalescingTransport(asyncio.Transport):
    """A transport whose writes made in one turn of the event loop go out together, in one
    system call (``writelines``: a ``writev`` on uvloop, without joining them).

    uvicorn and hypercorn write an answer's head, each body message and the chunked end
    apart: three writes for a small frame, each of which runs the loopback's TCP receive path
    in this process. Small writes wait for the end of the turn (or for ``_COALESCE_BYTES``),
    so a frame's answer leaves in one write; what is held never exceeds that bound. The
    servers' hooks call :meth:`flush` once an answer is complete."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._flush_scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._held.append(bytes(data) if not isinstance(data, bytes) else data)
        self._held_bytes += len(data)
        if self._held_bytes >= _COALESCE_BYTES:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Write what is held now."""
        self._flush_scheduled = False
        if not self._held:
            return
        held, self._held, self._held_bytes = self._held, [], 0
        if not self._transport.is_closing():
            self._transport.writelines(held)

    def get_write_buffer_size(self) -> int:
        return self._held_bytes + self._transport.get_write_buffer_size()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held, self._held_bytes = [], 0
        self._transport.abort()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()


class LingeringProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol on httptools, except for a connection whose request body was
    answered before it was read (413, a refused token, a failed upload).

    uvicorn keeps such a connection open to read and drop the rest of the body: gigabytes, for
    a refused upload. Here its write side is shut at once, so that the client sees the end of
    the answer, and it is closed when the client stops, or after ``_LINGER_SECONDS`` (as
    nginx's lingering close).
    """

    _lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._coalescing = _CoalescingTransport(transport, self.loop)
        super().connection_made(self._coalescing)

    def on_response_complete(self) -> None:
        self._coalescing.flush()  # the answer is complete: see _KeepAliveTimer.restart
        cycle = self.cycle
        if cycle is None or not cycle.more_body or self.transport.is_closing():
            super().on_response_complete()
            return
        self._lingering = True
        self.server_state.total_requests += 1
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(_LINGER_SECONDS, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if not self._lingering:
            super().data_received(data)


def _uvicorn_worker_app() -> DicomWebProxy:
    """The app of one uvicorn worker process (``serve --workers N``, ``engine = "uvicorn"``):
    uvicorn's workers stop gracefully on SIGTERM themselves."""
    return _worker_app()


def fix_hypercorn() -> None:
    """Two fixes to hypercorn 0.18's asyncio server, each of which held connections forever
    or for the whole keep-alive timeout (issue 19), larger reads (:data:`_MAX_RECV`), and
    less CPU per request (:func:`_lighten_connections`, :func:`_lighten_h11_framing`,
    :func:`_parse_with_httptools`); applied once per process."""
    from hypercorn.asyncio import tcp_server
    from hypercorn.asyncio.task_group import TaskGroup
    from hypercorn.asyncio.tcp_server import TCPServer

    if getattr(TCPServer, "_shanoir_fixed", False):
        return
    TCPServer._shanoir_fixed = True  # type: ignore[attr-defined]
    tcp_server.MAX_RECV = _MAX_RECV
    _lighten_connections(TCPServer)
    _lighten_h11_framing()
    _parse_with_httptools()
    read_data = TCPServer._read_data
    spawn_app = TaskGroup.spawn_app

    async def _read_data(self: TCPServer) -> None:
        # A connection its client closed between two requests stayed open (CLOSE_WAIT) until
        # keep_alive_timeout: its task group waits for the keep-alive timer, which nothing
        # stopped once the client's end of file was read.
        await read_data(self)
        await self.idle_task.stop()

    async def _spawn_app(
        self: TaskGroup, app: Any, config: Any, scope: Any, send: Any
    ) -> Callable[[Any], Awaitable[None]]:
        # An app that answers before reading the whole request body (a refused or failed
        # upload) left the body's queue full: the server then waited forever to put the rest
        # there, and the disconnect that ends the exchange, so the connection never closed.
        # Once the response is complete, what the app did not read is dropped.
        queue: asyncio.Queue[Any] | None = None
        answered = False

        def drain() -> None:
            while queue is not None and not queue.empty():
                queue.get_nowait()  # also frees a put already waiting

        async def app_send(message: Any) -> None:
            nonlocal answered
            if message is None or (
                message["type"] == "http.response.body" and not message.get("more_body", False)
            ):
                answered = True
                drain()
            await send(message)

        put = await spawn_app(self, app, config, scope, app_send)
        found = getattr(put, "__self__", None)
        if not isinstance(found, asyncio.Queue):
            return put  # not the hypercorn this was written for: leave it as it is
        queue = found

        async def app_put(message: Any) -> None:
            if not answered:
                await put(message)
            elif message["type"] == "http.disconnect":
                drain()  # room for it, for an app still reading
                queue.put_nowait(message)

        return app_put

    TCPServer._read_data = _read_data  # type: ignore[method-assign]
    TaskGroup.spawn_app = _spawn_app  # type: ignore[method-assign]


def _lighten_connections(server_class: type[Any]) -> None:
    """Each connection of hypercorn's asyncio server (``TCPServer``) writes through a
    :class:`_CoalescingTransport` and times its keep-alive with a :class:`_KeepAliveTimer`.

    hypercorn writes an answer's head, each body message and the end of a chunked body apart
    (three system calls for a small frame, each running the loopback's TCP receive path in
    this process), and starts two tasks each time a connection turns idle, which the next
    request cancels. Left alone when ``TCPServer`` does not keep what this relies on."""
    from hypercorn.asyncio.task_group import TaskGroup
    from hypercorn.asyncio.worker_context import AsyncioSingleTask

    init = server_class.__init__
    if (
        not all(
            callable(getattr(server_class, name, None))
            for name in ("_idle_timeout", "_initiate_server_close", "protocol_send")
        )
        or "_task_group" not in TaskGroup.__init__.__code__.co_names
    ):
        return

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        writer, reader = getattr(self, "writer", None), getattr(self, "reader", None)
        loop = getattr(self, "loop", None)
        if (
            type(writer) is not asyncio.StreamWriter
            or not isinstance(reader, asyncio.StreamReader)
            or not isinstance(loop, asyncio.AbstractEventLoop)
            or type(getattr(self, "idle_task", None)) is not AsyncioSingleTask
            or not hasattr(self, "context")
            or not hasattr(self, "config")
        ):
            return  # not the hypercorn this was written for
        transport = writer.transport
        coalescing = _CoalescingTransport(transport, loop)  # type: ignore[arg-type]
        self.writer = asyncio.StreamWriter(coalescing, transport.get_protocol(), reader, loop)
        # Kept: a StreamWriter let go of while its connection is open closes it (__del__).
        self._shanoir_own_writer = writer
        self.idle_task = _KeepAliveTimer(self, coalescing.flush)

    server_class.__init__ = __init__


class _KeepAliveTimer:
    """A hypercorn connection's keep-alive timeout (``TCPServer.idle_task``) on a timer.

    hypercorn's own (``AsyncioSingleTask``) starts a task each time the connection turns idle,
    which waits (``wait_for``: a second task) for ``keep_alive_timeout`` or for the server to
    stop, and the next request cancels both: ~25 µs of CPU per request of a kept-alive
    connection. Here turning idle arms a timer (~1 µs) and the next request disarms it; the
    connection is closed as before (``_initiate_server_close``, in its task group) when the
    timer fires, or at once when the server stops (``context.terminated``: one task per
    worker watches it for every idle connection).
    """

    def __init__(self, server: Any, flush: Callable[[], None]) -> None:
        self._server = server
        self._flush = flush
        self._loop: asyncio.AbstractEventLoop = server.loop
        self._idle = _idle_timers(server.context, self._loop)
        self._handle: asyncio.TimerHandle | None = None
        self._group: Any = None
        self._task: asyncio.Task[None] | None = None

    async def restart(self, task_group: Any, action: Callable[[], Awaitable[None]]) -> None:
        # The connection turns idle: an answer is complete. It leaves now, not at the end of
        # the loop's turn, after the app's own end of request (access log, metrics, the
        # upstream connection back to its pool), which every request at c=1 waited for.
        self._flush()
        await self.stop()
        if action != self._server._idle_timeout:  # someone else's timeout: as hypercorn does
            self._task = task_group._task_group.create_task(action())
            return
        self._group = task_group
        if self._server.context.terminated.is_set():
            self.expire()
            return
        self._handle = self._loop.call_later(self._server.config.keep_alive_timeout, self.expire)
        self._idle.add(self)

    async def stop(self) -> None:
        self._disarm()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def expire(self) -> None:
        """Close the connection now: it stayed idle for the whole timeout, or the server
        stops."""
        group = self._group
        self._disarm()
        if group is None or self._task is not None:
            return
        close = self._close()
        try:
            self._task = group._task_group.create_task(close)
        except RuntimeError:  # the connection's task group is ending already
            close.close()

    def _disarm(self) -> None:
        self._group = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._idle.discard(self)

    async def _close(self) -> None:
        # What hypercorn's _idle_timeout does once its wait is over.
        await asyncio.shield(self._server._initiate_server_close())


def _idle_timers(context: Any, loop: asyncio.AbstractEventLoop) -> set[_KeepAliveTimer]:
    """The armed keep-alive timers of a hypercorn worker (``context``), all expired at once
    when it stops serving."""
    timers: set[_KeepAliveTimer] | None = getattr(context, "_shanoir_idle_timers", None)
    if timers is None:
        timers = set()
        context._shanoir_idle_timers = timers
        context._shanoir_idle_watch = loop.create_task(_expire_when_stopping(context, timers))
    return timers


async def _expire_when_stopping(context: Any, timers: set[_KeepAliveTimer]) -> None:
    await context.terminated.wait()
    for timer in list(timers):
        timer.expire()


def _parse_with_httptools() -> None:
    """hypercorn's HTTP/1.1 connections on httptools (:class:`FastH11Protocol`): its
    ``ProtocolWrapper`` makes them with the ``H11Protocol`` its module names. Left alone
    unless that is the class :class:`FastH11Protocol` was written for."""
    import hypercorn.protocol as wrapper
    from hypercorn.protocol.h11 import H11Protocol

    from ._http1 import FastH11Protocol  # hypercorn is imported only by the commands that serve

    if getattr(wrapper, "H11Protocol", None) is H11Protocol and FastH11Protocol.fits(H11Protocol):
        setattr(wrapper, "H11Protocol", FastH11Protocol)  # noqa: B010 (not re-exported)


def _lighten_h11_framing() -> None:
    """h11 validates an answer's header fields when hypercorn builds its ``Response``, then
    twice again to frame a body of unknown length (``set_comma_header``: no
    ``Content-Length``, ``Transfer-Encoding: chunked``), each time all of them: 15 µs per
    chunked answer of the proxy's on the bench machine, 3 µs here. The fields kept were
    validated already; only the new ones are.

    Left alone unless the result is the same as h11's own on samples, and h11 keeps its
    fields where this expects them."""
    from h11 import _connection, _headers

    original = _headers.set_comma_header
    used = _connection.set_comma_header  # type: ignore[attr-defined]
    if used is not original or "_full_items" not in getattr(_headers.Headers, "__slots__", ()):
        return

    def set_comma_header(
        headers: _headers.Headers, name: bytes, new_values: list[bytes]
    ) -> _headers.Headers:
        kept = [item for item in headers._full_items if item[1] != name]
        if new_values:
            added = _headers.normalize_and_validate([(name.title(), v) for v in new_values])
            kept += added._full_items
        return _headers.Headers(kept)

    sample = _headers.normalize_and_validate(
        [
            (b"Content-Type", b"multipart/related; boundary=x"),
            (b"content-length", b"12"),
            (b"Connection", b"keep-alive"),
            (b"x-request-id", b"0123"),
        ]
    )
    for name, values in (
        (b"content-length", []),
        (b"transfer-encoding", [b"chunked"]),
        (b"connection", [b"close", b"keep-alive"]),
    ):
        if set_comma_header(sample, name, values)._full_items != (
            original(sample, name, values)._full_items
        ):
            return
    _connection.set_comma_header = set_comma_header  # type: ignore[attr-defined]
