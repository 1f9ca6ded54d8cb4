"""The servers ``serve`` runs: what the proxy changes in uvicorn's protocol and hypercorn's
connections.

uvicorn writes an answer's head, each body message and the end of a chunked body apart; on
loopback each write runs the TCP receive path in the proxy's process. The proxy's protocol
sends the writes of one turn of the event loop together, in one ``writelines``, and must keep
their order, hold no more than a bound, and lose nothing on close. hypercorn's connections
(``fix_hypercorn``) write the same way, time their keep-alive without a task per request, and
h11 validates an answer's header fields once instead of three times.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import h11
import h11._headers
import hypercorn.asyncio
import pytest
import uvicorn
from hypercorn.asyncio.worker_context import WorkerContext
from uvicorn.server import ServerState

from shanoir_dicomweb_proxy import Settings, _engines, create_app
from shanoir_dicomweb_proxy._engines import _COALESCE_BYTES, LingeringProtocol, fix_hypercorn
from shanoir_dicomweb_proxy._types import Receive, Scope, Send

from .support.connections import (
    FRAME_ANSWER_END,
    GET,
    HypercornConnection,
    RecordingTransport,
    frame_app,
)


def _protocol(app: Any) -> tuple[LingeringProtocol, RecordingTransport]:
    config = uvicorn.Config(app, lifespan="off", access_log=False, log_config=None)
    config.load()
    protocol = LingeringProtocol(config, ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def test_a_small_answer_leaves_in_one_system_call() -> None:
    protocol, transport = _protocol(frame_app)
    protocol.data_received(b"GET /frames/1 HTTP/1.1\r\nHost: proxy\r\n\r\n")
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(transport.calls) == 1
    answer = transport.calls[0]
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\n\r\n2000\r\n" + b"x" * 8192 + b"\r\n0\r\n\r\n")
    protocol.connection_lost(None)


def _app_noting_what_was_sent(sent: list[bytes], noted: list[bytes]) -> Any:
    """An app answering a small frame, then noting what reached the socket by the time its
    last ``send`` returned: before the app's own end of request (the proxy's access log,
    metrics, its upstream connection back to the pool), which does not wait on the loop."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await frame_app(scope, receive, send)
        noted.append(b"".join(sent))

    return app


async def test_a_complete_answer_leaves_before_the_app_returns() -> None:
    noted: list[bytes] = []
    calls: list[bytes] = []
    protocol, transport = _protocol(_app_noting_what_was_sent(calls, noted))
    transport.calls = calls
    protocol.data_received(GET)
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(noted) == 1 and noted[0].endswith(FRAME_ANSWER_END)
    assert len(calls) == 1  # still one system call
    protocol.connection_lost(None)


async def test_writes_keep_their_order_and_a_large_one_is_not_held() -> None:
    protocol, transport = _protocol(frame_app)
    coalescing = protocol.transport
    coalescing.write(b"head")
    coalescing.write(b"small")
    assert transport.calls == []  # held until the end of this turn of the loop
    coalescing.write(b"y" * _COALESCE_BYTES)
    assert transport.calls == [b"headsmall" + b"y" * _COALESCE_BYTES]
    coalescing.write(b"tail")
    await asyncio.sleep(0)
    assert transport.calls[1:] == [b"tail"]


async def test_close_sends_what_is_held_and_abort_drops_it() -> None:
    protocol, transport = _protocol(frame_app)
    protocol.transport.write(b"end of an answer")
    protocol.transport.close()
    assert transport.calls == [b"end of an answer"] and transport.closed

    protocol, transport = _protocol(frame_app)
    protocol.transport.write(b"half an answer")
    protocol.transport.abort()
    await asyncio.sleep(0)
    assert transport.calls == [] and transport.aborted


# --- hypercorn ---------------------------------------------------------------------------------


async def test_hypercorn_sends_a_small_answer_in_one_system_call() -> None:
    connection = HypercornConnection(frame_app)
    answer = await connection.request()
    assert len(connection.calls) == 1  # head, body and end: three writes before
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(FRAME_ANSWER_END)
    assert b"\r\nserver:" not in answer.lower()  # as uvicorn is set up
    assert b"\r\ndate: " in answer
    await connection.hang_up()
    assert connection.closed


async def test_hypercorn_sends_a_complete_answer_before_the_app_returns() -> None:
    noted: list[bytes] = []
    calls: list[bytes] = []
    connection = HypercornConnection(_app_noting_what_was_sent(calls, noted))
    connection.calls = calls
    for _ in range(2):  # the first request of a connection, and one kept alive
        assert (await connection.request()).endswith(FRAME_ANSWER_END)
        assert noted[-1].endswith(FRAME_ANSWER_END)
    assert len(noted) == 2 and len(calls) == 2
    await connection.hang_up()


@contextlib.contextmanager
def created_tasks() -> Iterator[list[asyncio.Task[Any]]]:
    """The tasks the running event loop creates meanwhile."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[Any]] = []
    factory = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        tasks.append(task)
        return task

    loop.set_task_factory(counting)
    try:
        yield tasks
    finally:
        loop.set_task_factory(factory)


async def test_hypercorn_starts_no_task_between_requests() -> None:
    with created_tasks() as created:
        connection = HypercornConnection(frame_app)
        await connection.request()
        before = len(created)
        for _ in range(20):
            assert (await connection.request()).endswith(FRAME_ANSWER_END)
        # One per request, the app's: hypercorn's keep-alive timeout took two more (its idle
        # task and wait_for's) each time the connection turned idle.
        assert len(created) - before == 20
    await connection.hang_up()


async def test_hypercorn_closes_a_connection_idle_for_the_keep_alive_timeout() -> None:
    connection = HypercornConnection(frame_app, keep_alive_timeout=0.3)
    await connection.request()
    await asyncio.sleep(0.2)
    assert (await connection.request()).endswith(FRAME_ANSWER_END)  # the timeout starts again
    await asyncio.sleep(0.2)
    assert not connection.closed
    await asyncio.sleep(0.3)
    assert connection.closed
    await asyncio.wait_for(connection.task, 5)


async def test_hypercorn_keeps_a_connection_open_while_it_answers() -> None:
    release = asyncio.Event()

    async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
        await release.wait()
        await frame_app(scope, receive, send)

    connection = HypercornConnection(slow_app, keep_alive_timeout=0.1)
    connection.reader.feed_data(GET)
    await asyncio.sleep(0.3)
    assert not connection.closed  # a request under way is not idle
    release.set()
    for _ in range(50):
        await asyncio.sleep(0)
    assert b"".join(connection.calls).endswith(FRAME_ANSWER_END)
    await asyncio.sleep(0.3)
    assert connection.closed
    await asyncio.wait_for(connection.task, 5)


async def test_hypercorn_closes_idle_connections_at_once_when_it_stops() -> None:
    worker = WorkerContext(None)
    first = HypercornConnection(frame_app, context=worker)
    second = HypercornConnection(frame_app, context=worker)
    await first.request()
    await second.request()
    await worker.terminated.set()  # what hypercorn's worker does on SIGTERM
    await asyncio.wait_for(asyncio.gather(first.task, second.task), 1)
    assert first.closed and second.closed


def _comma_validations(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    checked: list[bytes] = []
    validate = getattr(h11._headers, "validate")  # noqa: B009 (not exported)

    def counting(regex: Any, data: bytes, *args: Any) -> Any:
        checked.append(data)
        return validate(regex, data, *args)

    monkeypatch.setattr(h11._headers, "validate", counting)
    return checked


def test_h11_validates_the_fields_of_a_chunked_answer_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fix_hypercorn()
    checked = _comma_validations(monkeypatch)
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(GET)
    assert isinstance(connection.next_event(), h11.Request)
    fields = [(b"content-type", b"multipart/related; boundary=b"), (b"x-request-id", b"1f")]
    head = connection.send(h11.Response(status_code=200, headers=fields))
    assert head.endswith(
        b"content-type: multipart/related; boundary=b\r\nx-request-id: 1f\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    # Each name and value once, and the new field: 14 checks before (the fields were checked
    # again to drop a Content-Length, and again to add Transfer-Encoding).
    assert checked == [
        b"content-type",
        b"multipart/related; boundary=b",
        b"x-request-id",
        b"1f",
        b"Transfer-Encoding",
        b"chunked",
    ]


@pytest.mark.parametrize(
    ("fields", "name", "values"),
    [
        ([(b"Content-Length", b"10"), (b"X-A", b"1")], b"content-length", []),
        ([(b"content-type", b"a/b"), (b"Connection", b"keep-alive")], b"connection", [b"close"]),
        ([(b"transfer-encoding", b"chunked"), (b"x", b"y")], b"transfer-encoding", [b"chunked"]),
        ([(b"x", b"y")], b"transfer-encoding", []),
        ([], b"connection", [b"close", b"upgrade"]),
    ],
)
def test_h11_framing_fields_are_set_as_h11_sets_them(
    fields: list[tuple[bytes, bytes]], name: bytes, values: list[bytes]
) -> None:
    fix_hypercorn()
    headers = h11._headers.normalize_and_validate(fields)
    ours = h11._connection.set_comma_header(headers, name, values)  # type: ignore[attr-defined]
    theirs = h11._headers.set_comma_header(headers, name, values)
    assert ours._full_items == theirs._full_items


def test_h11_still_refuses_a_bad_framing_field() -> None:
    fix_hypercorn()
    headers = h11._headers.normalize_and_validate([(b"x", b"y")])
    with pytest.raises(h11.LocalProtocolError):
        h11._connection.set_comma_header(headers, b"transfer-encoding", [b"gzip"])  # type: ignore[attr-defined]


def test_tune_gc_frees_startup_garbage_freezes_the_rest_and_raises_the_young_threshold() -> None:
    # In a process of its own: freezing is for good, and the threshold is the process's.
    script = """
import gc, weakref
from shanoir_dicomweb_proxy._engines import tune_gc
class Node: pass
cycle = Node(); cycle.self = cycle; dead = weakref.ref(cycle); del cycle
kept = Node()
tune_gc()
walked = any(o is kept for o in gc.get_objects())  # the objects collections look at
print(gc.get_threshold()[0], gc.get_freeze_count(), dead() is None, walked)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    young, frozen, freed, walked = done.stdout.split()
    assert int(young) == 10_000
    assert int(frozen) > 10_000  # what the imports built
    assert freed == "True"  # a cycle left by startup is collected, not frozen
    assert walked == "False"  # what startup kept is out of every collection


@pytest.mark.parametrize("engine", ["hypercorn", "uvicorn"])
def test_serve_tunes_the_gc_once_the_app_is_built_and_before_serving(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    monkeypatch.setattr(_engines, "tune_gc", lambda: events.append("tune_gc"))
    monkeypatch.setattr(_engines, "keep_heap", lambda: None)

    async def fake_serve(app: object, config: object) -> None:
        events.append("serve")

    monkeypatch.setattr(hypercorn.asyncio, "serve", fake_serve)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: events.append("serve"))
    settings = Settings.from_dict(
        {
            "server": {"engine": engine},
            "upstream": {"url": "http://pacs.invalid/dicom-web"},
            "auth": {"enabled": False},
            "mapping": {"backend": "identity"},
            "access": {"backend": "allow_all"},
        }
    )
    app = create_app(settings)
    with contextlib.ExitStack() as stack:
        for stop in (signal.SIGTERM, signal.SIGINT):  # uvicorn's run_server replaces them
            stack.callback(signal.signal, stop, signal.getsignal(stop))
        assert _engines.run_server(app, settings, "unused.toml", workers=1) == 0
    assert events == ["tune_gc", "serve"]
