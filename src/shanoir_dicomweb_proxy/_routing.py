"""PS3.18 Studies Service routes: path → :class:`DicomWebRequest`, or 400/404/405.

Only what parses as a DICOMweb route of the Studies Service ever reaches the upstream, and the
upstream path is rebuilt from the parsed request, never copied from the client: dot-segments,
encoded slashes and dcm4chee's delete, reject or admin endpoints under the same base have no
way through.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, quote

from ._errors import (
    BadRequest,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    UnsupportedMediaType,
)
from ._headers import header, parse_media_type, split_accept
from ._types import ASGIApp, Receive, Scope, Send

__all__ = [
    "DicomWebRequest",
    "Level",
    "Resource",
    "RoutingMiddleware",
    "Service",
    "get_dicomweb_request",
    "parse_route",
]

SCOPE_KEY = "shanoir_dicomweb_proxy.request"


class Service(enum.StrEnum):
    QIDO = "qido"
    WADO = "wado"
    STOW = "stow"


class Resource(enum.StrEnum):
    SEARCH = "search"
    RETRIEVE = "retrieve"
    METADATA = "metadata"
    FRAMES = "frames"
    RENDERED = "rendered"
    THUMBNAIL = "thumbnail"
    BULKDATA = "bulkdata"
    STORE = "store"


class Level(enum.StrEnum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


@dataclass(frozen=True, slots=True)
class DicomWebRequest:
    """One parsed DICOMweb request, the object the layers of the stack speak through.

    For a search, ``level`` is the level searched for and the UIDs are the scope of the search
    (``/studies/{study}/series`` has level SERIES and ``study`` set). For every other request
    the UIDs name the resource addressed. ``query`` holds the decoded query parameters in order.
    """

    method: str
    service: Service
    resource: Resource
    level: Level
    study: str | None = None
    series: str | None = None
    instance: str | None = None
    frames: tuple[int, ...] = ()
    bulk_path: tuple[str, ...] = ()
    query: tuple[tuple[str, str], ...] = ()

    @property
    def route(self) -> str:
        """A short route kind for logs and metrics, such as ``wado.frames.instance``."""
        return f"{self.service}.{self.resource}.{self.level}"

    def path(self) -> str:
        """The path of this request relative to a DICOMweb root, with a leading slash."""
        if self.resource is Resource.STORE:
            return "/studies" if self.study is None else f"/studies/{self.study}"
        parts: list[str] = []
        if self.study is not None:
            parts += ["studies", self.study]
        if self.series is not None:
            parts += ["series", self.series]
        if self.instance is not None:
            parts += ["instances", self.instance]
        if self.resource is Resource.SEARCH:
            parts.append(_LEVEL_SEGMENT[self.level])
        elif self.resource is Resource.BULKDATA:
            parts += self.bulk_path
        else:
            if self.frames:
                parts += ["frames", ",".join(map(str, self.frames))]
            if self.resource in _SUFFIX_RESOURCES:
                parts.append(str(self.resource))
        return "/" + "/".join(parts)

    def query_string(self) -> str:
        """The query for the upstream.

        Values are percent-encoded except for ``* , ^ ? : / ;``: DICOM wildcards (PS3.18
        §8.3.4.6), comma lists (§8.3.4.1, ``includefield``, ``viewport``), PN component
        separators, and media types in ``accept=``. Orthanc does not percent-decode query
        strings, so the only way to make ``PatientName=Doe^J*`` match there is to send those
        characters literally, which RFC 3986 allows.
        """
        return "&".join(f"{key}={quote(value, safe=_QUERY_SAFE)}" for key, value in self.query)


_QUERY_SAFE = "*,^?:/;"
_LEVEL_SEGMENT = {Level.STUDY: "studies", Level.SERIES: "series", Level.INSTANCE: "instances"}
_SEGMENT_LEVEL = {v: k for k, v in _LEVEL_SEGMENT.items()}
_DEPTH = {Level.STUDY: 0, Level.SERIES: 1, Level.INSTANCE: 2}
_SUFFIX_RESOURCES = frozenset({Resource.METADATA, Resource.RENDERED, Resource.THUMBNAIL})

# PS3.5 §9.1: digits and dots, at most 64 characters. Leading zeros in components are not
# valid DICOM, but archives hold such UIDs, so they are accepted here.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_FRAMES = re.compile(r"[1-9][0-9]{0,8}(?:,[1-9][0-9]{0,8})*")
# A BulkDataURI path below an instance: Orthanc's ``bulk/7fe00010`` or ``bulk/00540016/0/...``,
# dcm4chee's ``bulkdata/7FE00010``. Tags are 8 hex digits, item indices decimal.
_BULK_SEGMENT = re.compile(r"[0-9A-Fa-f]{8}|[0-9]{1,9}")
_QUERY_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,128}")

_READ_METHODS = ("GET", "HEAD", "OPTIONS")
_STORE_METHODS = ("GET", "HEAD", "POST", "OPTIONS")


def _uid(segment: str) -> str:
    if len(segment) > 64 or not _UID.fullmatch(segment):
        raise NotFound("not a DICOMweb resource")
    return segment


def _frames(segment: str) -> tuple[int, ...]:
    if not _FRAMES.fullmatch(segment):
        raise NotFound("not a DICOMweb resource")
    return tuple(int(n) for n in segment.split(","))


def _parse_path(method: str, segments: list[str]) -> tuple[DicomWebRequest, tuple[str, ...]]:
    """Match path segments against the Studies Service grammar. Returns request and methods."""
    n = len(segments)
    # Searches at the root: /studies, /series, /instances.
    if n == 1 and segments[0] in _SEGMENT_LEVEL:
        level = _SEGMENT_LEVEL[segments[0]]
        if level is Level.STUDY:
            return _store_or(method, DicomWebRequest(method, Service.QIDO, Resource.SEARCH, level))
        return DicomWebRequest(method, Service.QIDO, Resource.SEARCH, level), _READ_METHODS
    if n < 2 or segments[0] != "studies":
        raise NotFound("not a DICOMweb resource")

    uids: list[str] = []
    rest = segments
    # Walk /studies/{s}[/series/{se}[/instances/{i}]], collecting UIDs.
    for keyword in ("studies", "series", "instances"):
        if len(rest) >= 2 and rest[0] == keyword:
            uids.append(_uid(rest[1]))
            rest = rest[2:]
        else:
            break
    level = (Level.STUDY, Level.SERIES, Level.INSTANCE)[len(uids) - 1]
    padded: list[str | None] = [*uids, None, None]
    study, series, instance = padded[:3]

    def make(
        service: Service,
        resource: Resource,
        lvl: Level = level,
        frames: tuple[int, ...] = (),
        bulk_path: tuple[str, ...] = (),
    ) -> DicomWebRequest:
        return DicomWebRequest(
            method, service, resource, lvl, study, series, instance, frames, bulk_path
        )

    if not rest:
        if level is Level.STUDY:
            return _store_or(method, make(Service.WADO, Resource.RETRIEVE))
        return make(Service.WADO, Resource.RETRIEVE), _READ_METHODS
    if len(rest) == 1:
        word = rest[0]
        # In-study searches: /studies/{s}/series, /studies/{s}/instances,
        # /studies/{s}/series/{se}/instances.
        if word in _SEGMENT_LEVEL and _DEPTH[_SEGMENT_LEVEL[word]] > _DEPTH[level]:
            return make(Service.QIDO, Resource.SEARCH, _SEGMENT_LEVEL[word]), _READ_METHODS
        if word in ("metadata", "rendered", "thumbnail"):
            return make(Service.WADO, Resource(word)), _READ_METHODS
        raise NotFound("not a DICOMweb resource")
    if level is Level.INSTANCE and rest[0] == "frames" and len(rest) <= 3:
        frames = _frames(rest[1])
        if len(rest) == 2:
            return make(Service.WADO, Resource.FRAMES, frames=frames), _READ_METHODS
        if rest[2] in ("rendered", "thumbnail"):
            return make(Service.WADO, Resource(rest[2]), frames=frames), _READ_METHODS
    if (
        level is Level.INSTANCE
        and rest[0] in ("bulk", "bulkdata")
        and 2 <= len(rest) <= 16
        and all(_BULK_SEGMENT.fullmatch(s) for s in rest[1:])
    ):
        return make(Service.WADO, Resource.BULKDATA, bulk_path=tuple(rest)), _READ_METHODS
    raise NotFound("not a DICOMweb resource")


def _store_or(method: str, request: DicomWebRequest) -> tuple[DicomWebRequest, tuple[str, ...]]:
    """``/studies`` and ``/studies/{s}`` are STOW targets for POST (PS3.18 §10.5)."""
    if method == "POST":
        return (
            DicomWebRequest(method, Service.STOW, Resource.STORE, Level.STUDY, study=request.study),
            _STORE_METHODS,
        )
    return request, _STORE_METHODS


def _parse_query(raw: bytes) -> tuple[tuple[str, str], ...]:
    if not raw:
        return ()
    try:
        pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest("the query string is not valid percent-encoded UTF-8") from exc
    for key, value in pairs:
        if not _QUERY_KEY.fullmatch(key):
            raise BadRequest(f"invalid query parameter name {key[:64]!r}")
        if key in ("limit", "offset") and not (value.isascii() and value.isdigit()):
            raise BadRequest(f"{key} must be a non-negative integer")
    return tuple(pairs)


def route_path(scope: Scope) -> str:
    """The request path below the mount point (``root_path``) of this app."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    return path[len(root_path) :] if root_path and path.startswith(root_path) else path


def parse_route(scope: Scope, *, base_path: str) -> tuple[DicomWebRequest, tuple[str, ...]]:
    """Parse an HTTP scope into a DICOMweb request and the methods its path allows.

    Raises NotFound for a path that is not a Studies Service route below ``base_path``,
    MethodNotAllowed for a method the route does not take, BadRequest for a broken query.
    """
    path = route_path(scope)
    if not path.startswith(base_path + "/"):
        raise NotFound("not a DICOMweb resource")
    segments = path[len(base_path) + 1 :].split("/")
    method = scope["method"]
    request, allowed = _parse_path(method, segments)
    if method not in allowed:
        raise MethodNotAllowed(f"{method} is not allowed on this resource", allow=allowed)
    query = _parse_query(scope.get("query_string", b""))
    if query:
        request = replace(request, query=query)
    return request, allowed


# What each resource can answer (PS3.18 §8.7.3, §8.7.4 and the tables of §10.4-10.6). A
# ``type/*`` entry accepts any subtype; ``multipart/related`` covers every part type.
_JSON_OR_XML = ("application/dicom+json", "application/json", "application/dicom+xml")
_ACCEPTABLE: dict[Resource, tuple[str, ...]] = {
    Resource.SEARCH: (*_JSON_OR_XML, "multipart/related"),
    Resource.METADATA: (*_JSON_OR_XML, "multipart/related"),
    Resource.RETRIEVE: ("multipart/related", "application/zip", "application/dicom"),
    Resource.FRAMES: ("multipart/related", "application/octet-stream", "image/*", "video/*"),
    Resource.BULKDATA: ("multipart/related", "application/octet-stream", "image/*", "video/*"),
    Resource.RENDERED: ("image/*", "video/*", "text/*", "application/pdf"),
    Resource.THUMBNAIL: ("image/*", "video/*"),
    Resource.STORE: _JSON_OR_XML,
}
_STOW_BODIES = frozenset({"application/dicom", "application/dicom+json", "application/dicom+xml"})


def _acceptable(media_range: str, offered: tuple[str, ...]) -> bool:
    """Whether an Accept media range overlaps one of the offered types."""
    if media_range in ("*/*", "*"):
        return True
    kind, _, subtype = media_range.partition("/")
    for offer in offered:
        offer_kind, _, offer_subtype = offer.partition("/")
        if kind == offer_kind and (subtype in ("*", offer_subtype) or offer_subtype == "*"):
            return True
    return False


def check_negotiation(scope: Scope, request: DicomWebRequest) -> None:
    """Refuse what no upstream could answer: 406 for an Accept outside PS3.18's media types
    for the resource, 415 for a STOW body that is not multipart/related DICOM."""
    if request.method == "POST":
        content_type = header(scope, b"content-type")
        media = parse_media_type(content_type.decode("latin-1")) if content_type else None
        if (
            media is None
            or media.type != "multipart/related"
            or (media.related_type not in _STOW_BODIES)
        ):
            raise UnsupportedMediaType(
                'STOW-RS takes multipart/related; type="application/dicom" '
                "(or application/dicom+json, application/dicom+xml)"
            )
        if "boundary" not in media.params:
            raise BadRequest("the multipart/related Content-Type has no boundary")
    accept = header(scope, b"accept")
    # An ``accept=`` query parameter overrides the header (PS3.18 §8.3.3.1); the upstream judges.
    if accept is None or any(key == "accept" for key, _ in request.query):
        return
    ranges = split_accept(accept.decode("latin-1"))
    offered = _ACCEPTABLE[request.resource]
    if ranges and not any(_acceptable(r.type, offered) for r in ranges):
        raise NotAcceptable(f"this resource cannot be answered as {accept.decode('latin-1')[:100]}")


def get_dicomweb_request(scope: Scope) -> DicomWebRequest:
    """The request parsed by :class:`RoutingMiddleware` for this scope."""
    request: DicomWebRequest = scope[SCOPE_KEY]
    return request


def set_dicomweb_request(scope: Scope, request: DicomWebRequest) -> None:
    """Replace the parsed request (the rewrite layer does, to address the upstream's UIDs)."""
    scope[SCOPE_KEY] = request


class RoutingMiddleware:
    """Parse the DICOMweb route; answer OPTIONS; refuse everything that is not a route.

    Puts a :class:`DicomWebRequest` in the scope for the layers below. Non-HTTP scopes pass
    straight through.
    """

    def __init__(self, app: ASGIApp, *, base_path: str = "") -> None:
        self.app = app
        self.base_path = base_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request, allowed = parse_route(scope, base_path=self.base_path)
        if request.method == "OPTIONS":
            # CORS preflights were answered further out; this is a plain OPTIONS, which PS3.18
            # does not define and Orthanc answers 404: say what the resource allows.
            await send(
                {
                    "type": "http.response.start",
                    "status": 204,
                    "headers": [(b"allow", ", ".join(allowed).encode())],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        check_negotiation(scope, request)
        set_dicomweb_request(scope, request)
        await self.app(scope, receive, send)
