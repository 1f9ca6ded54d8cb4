"""STOW-RS with identifiers translated and write rights decided per instance (DESIGN §3, §4).

The upload is parsed as it arrives: each ``application/dicom`` part goes through a Part 10
rewriter (:mod:`shanoir_dicomweb_proxy._dicom`) that first reads its header (SOP Class, SOP
Instance, Study and Series Instance UIDs) to decide on it, then rewrites the public study and
series UIDs it holds, top level and nested, to the real ones while its pixel data streams
through. Admitted
instances are spooled (to disk past 1 MiB); refused ones are left out. Only when the whole body
has been read and every part was a whole DICOM file does the PACS get the spooled batch, with
a Content-Length: a malformed or truncated upload stores nothing. With ``stream`` (``[upstream]
stream_uploads``), the admitted bytes go to the PACS as they come, in a request whose body
ends only once the upload has been read whole (:class:`_Feed`).

The answer merges the proxy's refusals with what the PACS stored (read from its JSON or XML
answer, and checked with a search for any instance it does not account for, since Orthanc
answers 400 to a batch with one bad part yet stores the others): 200 when every instance was
stored, 202 when some were, 409 when none was. A series the map does not know (a viewer's new
SEG or SR series) is registered under the examination once stored, when the map can register.
"""

from __future__ import annotations

import contextlib
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Final

import anyio
import anyio.abc
import orjson

from .._dicom import (
    FAILED_SOP_SEQUENCE,
    FAILURE_REASON,
    REFERENCED_SOP_CLASS_UID,
    REFERENCED_SOP_INSTANCE_UID,
    REFERENCED_SOP_SEQUENCE,
    RETRIEVE_URL,
    SERIES_INSTANCE_UID,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    DatasetView,
    JsonDataset,
    MultipartRewriter,
    Part10Rewriter,
    PartHeaders,
    Translation,
    UidCollector,
    XmlDataset,
    json_key,
    json_value,
    to_xml,
)
from .._errors import BadRequest, MalformedBody, ProxyError, UnsupportedMediaType
from .._headers import content_length, header, parse_media_type, wants_dicom_xml
from .._identifiers import SeriesRegistrar
from .._request import DicomWebRequest, Level, Resource, Service
from .._scope import WriteCheck, get_dicomweb_request, get_instance_audit, get_write_check
from .._spool import SPOOL_IN_MEMORY, spool_body, spooled_receive
from .._subrequests import search_json
from .._types import ASGIApp, Message, Receive, Scope, Send
from ._translator import IdentifierTranslator

__all__ = [
    "CANNOT_UNDERSTAND",
    "NOT_AUTHORIZED",
    "PROCESSING_FAILURE",
    "StowMiddleware",
]

#: FailureReason (0008,1197) values (PS3.4 C-STORE statuses).
NOT_AUTHORIZED: Final = 0x0124  # no write right, unknown examination, or not the path's study
PROCESSING_FAILURE: Final = 0x0110  # the PACS did not store it
CANNOT_UNDERSTAND: Final = 0xC000  # no SOP Instance, Study or Series Instance UID

_VERIFY_BATCH: Final = 100
_MAX_ANSWER: Final = 16 * 1024 * 1024
#: Bytes a streamed upload's request announces beyond the upload's own length (plus 1/256 of
#: it): room for the real UIDs that are longer than the public ones they replace.
_HEADROOM: Final = 64 * 1024
_PADDING: Final = 1024 * 1024  # bytes of that room sent at a time

#: What the PACS did with an upload: the SOP Instance UIDs it stored, and those it did not
#: with their FailureReason.
_Outcome = tuple[set[str], dict[str, int]]


@dataclass(slots=True)
class _Instance:
    """One part of the upload: what it is, where it goes, and what became of it."""

    sop_class: str = ""
    sop_instance: str = ""
    exam: int | None = None
    study: str = ""  # real UIDs, once admitted
    series: str = ""
    new_series: bool = False
    failure: int | None = None


@dataclass(slots=True)
class _Upload:
    """What one STOW request decided, part by part."""

    path_study: str | None  # real
    check: WriteCheck | None
    instances: list[_Instance] = field(default_factory=list)
    writable: dict[int, bool] = field(default_factory=dict)


class StowMiddleware:
    """Store uploads through the identifier map and the write rights (see the module).

    Sits below :class:`~._middleware.TranslationMiddleware`, which has turned the path's
    study into the real one and translates this layer's answer (its RetrieveURLs) back.
    Every other request passes through.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        translator: IdentifierTranslator,
        upstream_url: str,
        max_upload_bytes: int | None = None,
        registrar: SeriesRegistrar | None = None,
        store: ASGIApp | None = None,
        stream: bool = False,
    ) -> None:
        self.app = app
        self.translator = translator
        self.upstream_url = upstream_url.rstrip("/")
        self.max_upload_bytes = max_upload_bytes
        self.registrar = registrar
        #: Where admitted instances go instead of the PACS (a platform that registers them,
        #: such as Shanoir-NG's own STOW route); they then keep their public study UID, which
        #: the platform reads to find the examination. What was stored is still checked with
        #: the PACS.
        self.store = store
        #: Send admitted instances to the PACS while the upload arrives (with a Content-Length,
        #: and not to ``store``): for a PACS that stores nothing of a body cut short.
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = get_dicomweb_request(scope) if scope["type"] == "http" else None
        if request is None or request.resource is not Resource.STORE:
            await self.app(scope, receive, send)
            return
        boundary = _upload_boundary(scope)
        upload = _Upload(request.study, get_write_check(scope))
        length = content_length(scope) if self.stream and self.store is None else None
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
            if length is None:
                outcome = await self._read_then_store(scope, receive, boundary, upload, spool)
            else:
                outcome = await self._read_streaming(
                    scope, receive, boundary, upload, spool, length
                )
            if outcome is None:
                return  # the client left: the PACS got nothing, or a body cut short
        stored, failed = outcome
        admitted = [i for i in upload.instances if i.failure is None]
        await self._settle(scope, receive, admitted, stored, failed)
        audit = get_instance_audit(scope)
        if audit is not None:
            for instance in upload.instances:
                audit(_audit_fields(instance))
        await _answer(scope, send, upload, request.study, self.upstream_url)

    async def _read_then_store(
        self, scope: Scope, receive: Receive, boundary: bytes, upload: _Upload, spool: IO[bytes]
    ) -> _Outcome | None:
        """Parse the upload into ``spool``, then send the admitted instances upstream: what
        the PACS says it did, or None if the client left."""
        parts = MultipartRewriter(boundary, lambda headers: self._part(headers, upload))
        with _from_client():
            size = await spool_body(receive, spool, self.max_upload_bytes, parts)
        if size is None:
            return None
        _require_instances(upload)
        if not any(i.failure is None for i in upload.instances):
            return set(), {}
        return await self._store(scope, boundary, size, spooled_receive(spool, receive))

    async def _read_streaming(
        self,
        scope: Scope,
        receive: Receive,
        boundary: bytes,
        upload: _Upload,
        spool: IO[bytes],
        length: int,
    ) -> _Outcome | None:
        """:meth:`_read_then_store`, the admitted bytes going upstream as they come (see
        :class:`_Feed`). They are spooled all the same, for an upload whose UIDs outgrow the
        room the request kept for them."""
        budget = length + _HEADROOM + length // 256
        parts = MultipartRewriter(boundary, lambda headers: self._part(headers, upload))
        error: Exception | None = None
        size: int | None = None
        async with anyio.create_task_group() as tasks:
            feed = _Feed(
                tasks, lambda body: self._store(scope, boundary, budget, body), receive, budget
            )
            try:
                with _from_client():
                    size = await spool_body(
                        receive, spool, self.max_upload_bytes, _Teed(parts, feed, upload)
                    )
                if size is not None:
                    _require_instances(upload)
            except Exception as exc:  # raised below, once the PACS's request is cut off
                error, size = exc, None
            if size is None:
                feed.cut()
            else:
                await feed.finish()
        if error is not None:
            raise error
        if size is None:
            return None
        if feed.outcome is not None:
            return feed.outcome
        if feed.overflowed:
            return await self._store(scope, boundary, size, spooled_receive(spool, receive))
        return set(), {}  # nothing admitted, so nothing was sent

    def _part(self, headers: PartHeaders, upload: _Upload) -> Part10Rewriter:
        for name, value in headers:
            if name.strip().lower() == b"content-type":
                media = parse_media_type(value.decode("latin-1").strip())
                if media.type != "application/dicom":
                    raise UnsupportedMediaType(
                        f"a part of type {media.type}: only application/dicom parts are stored"
                    )
        instance = _Instance()
        upload.instances.append(instance)

        async def admit(view: DatasetView) -> bool:
            instance.failure = await self._admit(view, instance, upload)
            return instance.failure is None

        return Part10Rewriter(self._resolve, study_known=True, admit=admit)

    async def _admit(self, view: DatasetView, instance: _Instance, upload: _Upload) -> int | None:
        """Decide on one instance from its header: None to store it, else why not."""
        instance.sop_class = _first(view.get(SOP_CLASS_UID))
        instance.sop_instance = _first(view.get(SOP_INSTANCE_UID))
        study, series = _first(view.get(STUDY_INSTANCE_UID)), _first(view.get(SERIES_INSTANCE_UID))
        if not (instance.sop_instance and study and series):
            return CANNOT_UNDERSTAND
        translator = self.translator
        exam = translator.formatter.exam_id(study)
        real = (await translator.real_studies([study])).get(study)
        if exam is None or real is None:
            return NOT_AUTHORIZED
        instance.exam = exam
        if upload.path_study is not None and real != upload.path_study:
            return NOT_AUTHORIZED
        if not await _writable(upload, exam):
            return NOT_AUTHORIZED
        acquisition = translator.formatter.acquisition_id(series)
        if acquisition is not None:
            entry = (await translator.identifiers.series_by_id([acquisition])).get(acquisition)
            if entry is None or entry.exam_id != exam:
                return NOT_AUTHORIZED
            real_series = entry.series_uid
        else:
            # A series of its own (a new SEG or SR series): it must not be another
            # examination's real series.
            known = (await translator.identifiers.series_by_uid([series])).get(series)
            if known is not None and known.exam_id != exam:
                return NOT_AUTHORIZED
            real_series, instance.new_series = series, known is None
        instance.study, instance.series = real, real_series
        return None

    async def _resolve(self, collector: UidCollector) -> Translation:
        """Public UIDs met in an admitted instance → real ones; anything else stays. Going to
        a platform (``store``), study UIDs stay public."""
        studies = (
            {} if self.store is not None else await self.translator.real_studies(collector.studies)
        )
        series = await self.translator.real_series(collector.series, exam_id=None)
        return Translation(
            studies={uid: studies.get(uid, uid) for uid in collector.studies},
            series={uid: series.get(uid, uid) for uid in collector.series},
        )

    async def _store(self, scope: Scope, boundary: bytes, size: int, body: Receive) -> _Outcome:
        """Send ``size`` bytes of admitted instances, read from ``body``, upstream: the SOP
        Instance UIDs the PACS says it stored, and those it says it did not with their
        FailureReason. An error is left to the caller."""
        content_type = b'multipart/related; type="application/dicom"; boundary=' + boundary
        headers = [
            (k, v)
            for k, v in scope["headers"]
            if k not in (b"content-type", b"content-length", b"accept", b"transfer-encoding")
        ]
        headers += [
            (b"content-type", content_type),
            (b"content-length", str(size).encode()),
            (b"accept", b"application/dicom+json"),
        ]
        answer = _Collected()
        try:
            await (self.store or self.app)({**scope, "headers": headers}, body, answer.send)
        except ProxyError:
            return set(), {}  # what was stored is found out by a search
        return _outcome(answer.content_type, answer.body)

    async def _settle(
        self,
        scope: Scope,
        receive: Receive,
        admitted: list[_Instance],
        stored: set[str],
        failed: dict[str, int],
    ) -> None:
        """Fill in each admitted instance's fate; ask the PACS about those its answer left
        out; register the new series of stored instances."""
        unsure = [
            i for i in admitted if i.sop_instance not in stored and i.sop_instance not in failed
        ]
        if unsure:
            stored |= await self._find(scope, receive, unsure)
        for instance in admitted:
            if instance.sop_instance in stored:
                continue
            instance.failure = failed.get(instance.sop_instance, PROCESSING_FAILURE)
        if self.registrar is None:
            return
        new = {(i.exam, i.series) for i in admitted if i.failure is None and i.new_series}
        for exam, series in sorted(new, key=str):
            assert exam is not None
            await self.registrar(exam, series)

    async def _find(self, scope: Scope, receive: Receive, instances: list[_Instance]) -> set[str]:
        """Which of ``instances`` the PACS holds, in the study and series meant."""
        found: set[str] = set()
        for start in range(0, len(instances), _VERIFY_BATCH):
            batch = instances[start : start + _VERIFY_BATCH]
            query = (
                ("SOPInstanceUID", ",".join(i.sop_instance for i in batch)),
                ("includefield", json_key(STUDY_INSTANCE_UID)),
                ("includefield", json_key(SERIES_INSTANCE_UID)),
            )
            search = DicomWebRequest(
                method="GET",
                service=Service.QIDO,
                resource=Resource.SEARCH,
                level=Level.INSTANCE,
                query=query,
            )
            held = {
                (
                    json_value(row, STUDY_INSTANCE_UID),
                    json_value(row, SERIES_INSTANCE_UID),
                    json_value(row, SOP_INSTANCE_UID),
                )
                for row in await search_json(self.app, scope, receive, search)
            }
            found |= {i.sop_instance for i in batch if (i.study, i.series, i.sop_instance) in held}
        return found


class _Feed:
    """The PACS's side of a streamed upload.

    The request is opened at the first admitted byte and announces ``budget`` bytes: the
    upload's own length and room for UIDs that grow. Its body ends, padded with spaces after
    the closing delimiter (an epilogue, which multipart readers skip), only once the whole
    upload has been read and found sound (:meth:`finish`). Anything wrong before that cuts
    the request off short of its length (:meth:`cut`), and the PACS stores nothing. So does
    output that would fill the budget before the end (:attr:`overflowed`): the spooled copy is
    sent instead once the upload has been read.
    """

    def __init__(
        self,
        tasks: anyio.abc.TaskGroup,
        store: Callable[[Receive], Awaitable[_Outcome]],
        client: Receive,
        budget: int,
    ) -> None:
        self._tasks = tasks
        self._store = store
        self._client = client
        self.budget = budget
        self.sent = 0
        self.started = False
        self.overflowed = False
        self.outcome: _Outcome | None = None
        self._cut = False
        self._ended = False
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        # A few chunks in flight at most: memory stays bounded by what the PACS takes.
        self._sender, self._receiver = anyio.create_memory_object_stream[bytes](4)

    async def put(self, data: bytes) -> None:
        """Pass ``data`` on; the first call opens the request."""
        if not data or self._cut:
            return
        if self.sent + len(data) >= self.budget:  # the last byte waits for finish()
            self.overflowed = True
            self.cut()
            return
        if not self.started:
            self.started = True
            self._tasks.start_soon(self._run)
        self.sent += len(data)
        with contextlib.suppress(anyio.BrokenResourceError):
            await self._sender.send(data)  # broken: the PACS has answered, or failed, already

    async def finish(self) -> None:
        """The upload was read whole and sound: complete the body, wait for the answer."""
        if not self.started or self._cut:
            return
        padding = b" " * min(self.budget - self.sent, _PADDING)
        with contextlib.suppress(anyio.BrokenResourceError):
            while self.sent < self.budget:
                piece = padding[: self.budget - self.sent]
                await self._sender.send(piece)
                self.sent += len(piece)
        self._sender.close()
        await self._done.wait()

    def cut(self) -> None:
        """End the request short of its length: the PACS stores nothing of it."""
        self._cut = True
        self._scope.cancel()
        self._sender.close()

    async def _run(self) -> None:
        with self._scope:
            try:
                self.outcome = await self._store(self._receive)
            finally:
                self._receiver.close()
                self._done.set()

    async def _receive(self) -> Message:
        if self._ended:
            return await self._client()  # the body is complete: the client's disconnect
        try:
            chunk = await self._receiver.receive()
        except anyio.EndOfStream:
            self._ended = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": chunk, "more_body": True}


class _Teed:
    """The rewriter of a streamed upload: its output also goes to the PACS, from the first
    admitted instance on."""

    def __init__(self, parts: MultipartRewriter, feed: _Feed, upload: _Upload) -> None:
        self._parts = parts
        self._feed = feed
        self._upload = upload

    async def feed(self, chunk: bytes) -> bytes:
        return await self._pass(await self._parts.feed(chunk))

    async def close(self) -> bytes:
        return await self._pass(await self._parts.close())

    async def _pass(self, out: bytes) -> bytes:
        if self._feed.started or any(i.failure is None and i.study for i in self._upload.instances):
            await self._feed.put(out)
        return out


@contextlib.contextmanager
def _from_client() -> Iterator[None]:
    """A malformed body is the client's fault (400), not the PACS's."""
    try:
        yield
    except MalformedBody as exc:
        raise exc.from_client() from exc


def _require_instances(upload: _Upload) -> None:
    if not upload.instances:
        raise BadRequest("the upload holds no instance")


def _upload_boundary(scope: Scope) -> bytes:
    """The boundary of the upload, which routing has checked to be multipart/related with a
    boundary and a STOW part type; of those, only application/dicom parts can be translated."""
    media = parse_media_type((header(scope, b"content-type") or b"").decode("latin-1"))
    related = media.related_type
    if related is not None and related != "application/dicom":
        raise UnsupportedMediaType(
            f"uploads of {related} are not supported: send application/dicom parts"
        )
    return media.params.get("boundary", "").encode("latin-1")


async def _writable(upload: _Upload, exam: int) -> bool:
    if upload.check is None:
        return True
    if exam not in upload.writable:
        upload.writable[exam] = exam in await upload.check(frozenset({exam}))
    return upload.writable[exam]


def _first(values: list[str] | None) -> str:
    return values[0] if values else ""


class _Collected:
    """A ``send`` keeping a small answer."""

    def __init__(self) -> None:
        self.status = 0
        self.content_type = b""
        self.body = b""

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.content_type = dict(message.get("headers", [])).get(b"content-type", b"")
        elif message["type"] == "http.response.body" and len(self.body) < _MAX_ANSWER:
            self.body += message.get("body", b"")


def _outcome(content_type: bytes, body: bytes) -> tuple[set[str], dict[str, int]]:
    """Stored SOP Instance UIDs and failed ones (with their reasons) from a STOW answer."""
    view: DatasetView
    try:
        if b"xml" in content_type:
            view = XmlDataset(ET.fromstring(body))  # noqa: S314 (the PACS's answer)
        else:
            data = orjson.loads(body)
            if not isinstance(data, dict):
                return set(), {}
            view = JsonDataset(data)
    except (ET.ParseError, orjson.JSONDecodeError):
        return set(), {}
    stored: set[str] = set()
    failed: dict[str, int] = {}
    for tag, items in view.sequences():
        for item in items:
            uid = _first(item.get(REFERENCED_SOP_INSTANCE_UID))
            if not uid:
                continue
            if tag == REFERENCED_SOP_SEQUENCE:
                stored.add(uid)
            elif tag == FAILED_SOP_SEQUENCE:
                failed[uid] = _failure_reason(item)
    return stored, failed


def _failure_reason(item: DatasetView) -> int:
    """The PACS's FailureReason (0008,1197) of a failed instance, 0x0110 when it gives none:
    a number in DICOM JSON, text in DICOM XML."""
    values: list[object] = list(item.get(FAILURE_REASON) or ())
    if not values and isinstance(item, JsonDataset):
        element = item.data.get(json_key(FAILURE_REASON))
        values = element.get("Value") or [] if isinstance(element, dict) else []
    try:
        reason = int(str(values[0])) if values else PROCESSING_FAILURE
    except ValueError:
        return PROCESSING_FAILURE
    return reason if 0 < reason <= 0xFFFF else PROCESSING_FAILURE


def _audit_fields(instance: _Instance) -> dict[str, Any]:
    return {
        "examinations": [instance.exam] if instance.exam is not None else [],
        "instance": instance.sop_instance,
        "decision": "allow" if instance.failure is None else "deny",
        "status": 200 if instance.failure is None else 409,
        "failure_reason": instance.failure,
    }


async def _answer(
    scope: Scope, send: Send, upload: _Upload, path_study: str | None, upstream_url: str
) -> None:
    """The PS3.18 answer, with real UIDs and upstream links that the translation layer
    turns into public ones on the way out."""
    stored = [i for i in upload.instances if i.failure is None]
    failed = [i for i in upload.instances if i.failure is not None]
    status = 200 if not failed else 202 if stored else 409
    dataset: dict[str, Any] = {}
    if path_study is not None:
        dataset[json_key(RETRIEVE_URL)] = _url(f"{upstream_url}/studies/{path_study}")
    if failed:
        dataset[json_key(FAILED_SOP_SEQUENCE)] = _sequence(
            {
                json_key(REFERENCED_SOP_CLASS_UID): _ui(i.sop_class),
                json_key(REFERENCED_SOP_INSTANCE_UID): _ui(i.sop_instance),
                json_key(FAILURE_REASON): {"vr": "US", "Value": [i.failure]},
            }
            for i in failed
        )
    if stored:
        dataset[json_key(REFERENCED_SOP_SEQUENCE)] = _sequence(
            {
                json_key(REFERENCED_SOP_CLASS_UID): _ui(i.sop_class),
                json_key(REFERENCED_SOP_INSTANCE_UID): _ui(i.sop_instance),
                json_key(RETRIEVE_URL): _url(
                    f"{upstream_url}/studies/{i.study}/series/{i.series}/instances/{i.sop_instance}"
                ),
            }
            for i in stored
        )
    if wants_dicom_xml(scope):
        body, media = to_xml(dataset), b"application/dicom+xml"
    else:
        body, media = orjson.dumps(dataset), b"application/dicom+json"
    headers = [(b"content-type", media), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _ui(uid: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [uid]} if uid else {"vr": "UI"}


def _url(url: str) -> dict[str, Any]:
    return {"vr": "UR", "Value": [url]}


def _sequence(items: Iterable[dict[str, Any]]) -> dict[str, Any]:
    return {"vr": "SQ", "Value": list(items)}
