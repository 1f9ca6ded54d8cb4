"""STOW-RS with identifiers translated and write rights decided per instance (DESIGN §3, §4).

The upload is parsed as it arrives: each ``application/dicom`` part goes through a
:class:`~._part10.Part10Rewriter` that first reads its header (SOP Class, SOP Instance, Study
and Series Instance UIDs) to decide on it, then rewrites the public study and series UIDs it
holds, top level and nested, to the real ones while its pixel data streams through. Admitted
instances are spooled (to disk past 1 MiB); refused ones are left out. Only when the whole body
has been read and every part was a whole DICOM file does the PACS get the spooled batch, with
a Content-Length: a malformed or truncated upload stores nothing.

The answer merges the proxy's refusals with what the PACS stored (read from its JSON or XML
answer, and checked with a search for any instance it does not account for, since Orthanc
answers 400 to a batch with one bad part yet stores the others): 200 when every instance was
stored, 202 when some were, 409 when none was. A series the map does not know (a viewer's new
SEG or SR series) is registered under the examination once stored, when the map can register.
"""

from __future__ import annotations

import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import IO, Any, Final

import anyio
import anyio.to_thread
import orjson

from ._bodies import _JsonDataset, _XmlDataset
from ._errors import (
    BadRequest,
    MalformedBody,
    PayloadTooLarge,
    ProxyError,
    UnsupportedMediaType,
)
from ._headers import header, parse_media_type, wants_dicom_xml
from ._multipart import MultipartRewriter, PartHeaders
from ._part10 import Part10Rewriter
from ._routing import DicomWebRequest, Level, Resource, Service, get_dicomweb_request
from ._translate import DatasetView, Translation, UidCollector
from ._translating import IdentifierTranslator, json_value, run_search
from ._types import ASGIApp, Message, Receive, Scope, Send
from ._upstream import _SPOOL_IN_MEMORY, _SPOOL_WRITE, spool_body

__all__ = [
    "CANNOT_UNDERSTAND",
    "NOT_AUTHORIZED",
    "PROCESSING_FAILURE",
    "SeriesRegistrar",
    "StowMiddleware",
    "set_instance_audit",
    "set_write_check",
]

#: FailureReason (0008,1197) values (PS3.4 C-STORE statuses).
NOT_AUTHORIZED: Final = 0x0124  # no write right, unknown examination, or not the path's study
PROCESSING_FAILURE: Final = 0x0110  # the PACS did not store it
CANNOT_UNDERSTAND: Final = 0xC000  # no SOP Instance, Study or Series Instance UID

_SOP_CLASS: Final = 0x00080016
_SOP_INSTANCE: Final = 0x00080018
_STUDY: Final = 0x0020000D
_SERIES: Final = 0x0020000E
_REFERENCED_SOP_SEQUENCE: Final = 0x00081199
_FAILED_SOP_SEQUENCE: Final = 0x00081198
_REFERENCED_SOP_INSTANCE: Final = 0x00081155

_VERIFY_BATCH: Final = 100
_MAX_ANSWER: Final = 16 * 1024 * 1024

#: Given examination IDs, those the caller may write into.
WriteCheck = Callable[[frozenset[int]], Awaitable[Collection[int]]]
#: Register a real series UID under an examination.
SeriesRegistrar = Callable[[int, str], Awaitable[None]]
#: Write one audit line about one instance (fields added to the request's line).
InstanceAudit = Callable[[dict[str, Any]], None]

_WRITE_KEY = "shanoir_dicomweb_proxy.write_check"
_AUDIT_KEY = "shanoir_dicomweb_proxy.instance_audit"


def set_write_check(scope: Scope, check: WriteCheck) -> None:
    """Restrict what an upload may store in this request to examinations ``check`` allows."""
    scope[_WRITE_KEY] = check


def set_instance_audit(scope: Scope, audit: InstanceAudit) -> None:
    """Have an upload audit each of its instances through ``audit``."""
    scope[_AUDIT_KEY] = audit


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

    Sits below :class:`~._translating.TranslationMiddleware`, which has turned the path's
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
    ) -> None:
        self.app = app
        self.translator = translator
        self.upstream_url = upstream_url.rstrip("/")
        self.max_upload_bytes = max_upload_bytes
        self.registrar = registrar

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = get_dicomweb_request(scope) if scope["type"] == "http" else None
        if request is None or request.resource is not Resource.STORE:
            await self.app(scope, receive, send)
            return
        boundary = _upload_boundary(scope)
        length = header(scope, b"content-length")
        limit = self.max_upload_bytes
        if limit is not None and length is not None and length.isdigit() and int(length) > limit:
            raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
        upload = _Upload(request.study, scope.get(_WRITE_KEY))
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as spool:
            size = await self._read(receive, boundary, upload, spool)
            if size is None:
                return  # the client left: nothing was sent upstream
            if not upload.instances:
                raise BadRequest("the upload holds no instance")
            admitted = [i for i in upload.instances if i.failure is None]
            stored: set[str] = set()
            failed: dict[str, int] = {}
            if admitted:
                stored, failed = await self._store(scope, receive, request, boundary, spool, size)
        await self._settle(scope, receive, admitted, stored, failed)
        audit = scope.get(_AUDIT_KEY)
        if audit is not None:
            for instance in upload.instances:
                audit(_audit_fields(instance))
        await _answer(scope, send, upload, request.study, self.upstream_url)

    async def _read(
        self, receive: Receive, boundary: bytes, upload: _Upload, spool: IO[bytes]
    ) -> int | None:
        """Parse the upload into ``spool``: its size, or None if the client left."""
        parts = MultipartRewriter(boundary, lambda headers: self._part(headers, upload))
        try:
            return await spool_body(receive, spool, self.max_upload_bytes, parts)
        except MalformedBody as exc:
            raise exc.from_client() from exc

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
        instance.sop_class = _first(view.get(_SOP_CLASS))
        instance.sop_instance = _first(view.get(_SOP_INSTANCE))
        study, series = _first(view.get(_STUDY)), _first(view.get(_SERIES))
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
        """Public UIDs met in an admitted instance → real ones; anything else stays."""
        studies = await self.translator.real_studies(collector.studies)
        series = await self.translator.real_series(collector.series, exam_id=None)
        return Translation(
            studies={uid: studies.get(uid, uid) for uid in collector.studies},
            series={uid: series.get(uid, uid) for uid in collector.series},
        )

    async def _store(
        self,
        scope: Scope,
        receive: Receive,
        request: DicomWebRequest,
        boundary: bytes,
        spool: IO[bytes],
        size: int,
    ) -> tuple[set[str], dict[str, int]]:
        """Send the spooled batch upstream: the SOP Instance UIDs it says it stored, and
        those it says it did not with their FailureReason. An error is left to the caller."""
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
            await self.app(
                {**scope, "headers": headers}, _spooled_receive(spool, receive), answer.send
            )
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
                ("includefield", "0020000D"),
                ("includefield", "0020000E"),
            )
            search = DicomWebRequest(
                method="GET",
                service=Service.QIDO,
                resource=Resource.SEARCH,
                level=Level.INSTANCE,
                query=query,
            )
            _, body = await run_search(
                self.app, scope, receive, search, accept=b"application/dicom+json"
            )
            rows = orjson.loads(body or b"[]")
            held = {
                (json_value(r, "0020000D"), json_value(r, "0020000E"), json_value(r, "00080018"))
                for r in rows
                if isinstance(r, dict)
            }
            found |= {i.sop_instance for i in batch if (i.study, i.series, i.sop_instance) in held}
        return found


def _upload_boundary(scope: Scope) -> bytes:
    raw = header(scope, b"content-type")
    if raw is None:
        raise UnsupportedMediaType('an upload must be multipart/related; type="application/dicom"')
    media = parse_media_type(raw.decode("latin-1"))
    boundary = media.params.get("boundary")
    if media.type != "multipart/related" or not boundary:
        raise UnsupportedMediaType('an upload must be multipart/related; type="application/dicom"')
    related = media.related_type
    if related is not None and related != "application/dicom":
        raise UnsupportedMediaType(
            f"uploads of {related} are not supported: send application/dicom parts"
        )
    return boundary.encode("latin-1")


async def _writable(upload: _Upload, exam: int) -> bool:
    if upload.check is None:
        return True
    if exam not in upload.writable:
        upload.writable[exam] = exam in await upload.check(frozenset({exam}))
    return upload.writable[exam]


def _first(values: list[str] | None) -> str:
    return values[0] if values else ""


def _spooled_receive(spool: IO[bytes], receive: Receive) -> Receive:
    """A ``receive`` giving the spooled body, then the client's own (its disconnect)."""
    done = False

    async def next_message() -> Message:
        nonlocal done
        if done:
            return await receive()
        chunk = await anyio.to_thread.run_sync(spool.read, _SPOOL_WRITE)
        if len(chunk) < _SPOOL_WRITE:
            done = True
        return {"type": "http.request", "body": chunk, "more_body": not done}

    return next_message


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
            view = _XmlDataset(ET.fromstring(body))  # noqa: S314 (the PACS's answer)
        else:
            data = orjson.loads(body)
            if not isinstance(data, dict):
                return set(), {}
            view = _JsonDataset(data)
    except (ET.ParseError, orjson.JSONDecodeError):
        return set(), {}
    stored: set[str] = set()
    failed: dict[str, int] = {}
    for tag, items in view.sequences():
        for item in items:
            uid = _first(item.get(_REFERENCED_SOP_INSTANCE))
            if not uid:
                continue
            if tag == _REFERENCED_SOP_SEQUENCE:
                stored.add(uid)
            elif tag == _FAILED_SOP_SEQUENCE:
                failed[uid] = PROCESSING_FAILURE
    return stored, failed


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
        dataset["00081190"] = _url(f"{upstream_url}/studies/{path_study}")
    if failed:
        dataset["00081198"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": _ui(i.sop_class),
                    "00081155": _ui(i.sop_instance),
                    "00081197": {"vr": "US", "Value": [i.failure]},
                }
                for i in failed
            ],
        }
    if stored:
        dataset["00081199"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": _ui(i.sop_class),
                    "00081155": _ui(i.sop_instance),
                    "00081190": _url(
                        f"{upstream_url}/studies/{i.study}/series/{i.series}"
                        f"/instances/{i.sop_instance}"
                    ),
                }
                for i in stored
            ],
        }
    if wants_dicom_xml(scope):
        body, media = _to_xml(dataset), b"application/dicom+xml"
    else:
        body, media = orjson.dumps(dataset), b"application/dicom+json"
    headers = [(b"content-type", media), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _ui(uid: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [uid]} if uid else {"vr": "UI"}


def _url(url: str) -> dict[str, Any]:
    return {"vr": "UR", "Value": [url]}


_NATIVE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"


def _to_xml(dataset: dict[str, Any]) -> bytes:
    """The PS3.19 Native DICOM Model of this module's small answers."""
    root = ET.Element(f"{{{_NATIVE}}}NativeDicomModel")

    def fill(element: ET.Element, data: dict[str, Any]) -> None:
        for tag, attribute in data.items():
            attributes = {"tag": tag, "vr": attribute["vr"]}
            node = ET.SubElement(element, f"{{{_NATIVE}}}DicomAttribute", attributes)
            for number, value in enumerate(attribute.get("Value", []), start=1):
                if attribute["vr"] == "SQ":
                    item = ET.SubElement(node, f"{{{_NATIVE}}}Item", number=str(number))
                    fill(item, value)
                else:
                    child = ET.SubElement(node, f"{{{_NATIVE}}}Value", number=str(number))
                    child.text = str(value)

    fill(root, dataset)
    written: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return written
