"""PS3.18 Studies Service routes: path → :class:`DicomWebRequest`, or 400/404/405.

Only what parses as a DICOMweb route of the Studies Service ever reaches the upstream, and the
upstream path is rebuilt from the parsed request, never copied from the client: dot-segments,
encoded slashes and dcm4chee's delete, reject or admin endpoints under the same base have no
way through.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import NamedTuple
from urllib.parse import parse_qsl

from ._errors import (
    BadRequest,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from ._headers import content_length, header, parse_media_type, split_accept
from ._identifiers import is_uid
from ._request import DicomWebRequest, Level, Resource, Service
from ._scope import route_path, set_dicomweb_request
from ._types import ASGIApp, Receive, Scope, Send

__all__ = ["Route", "RoutingMiddleware", "check_negotiation", "parse_route"]

_SEGMENT_LEVEL = {level.segment: level for level in Level}

_FRAMES = re.compile(r"[1-9][0-9]{0,8}(?:,[1-9][0-9]{0,8})*")
_NUMBERS = re.compile(r"[0-9]+(?:,[0-9]+)*")
# Clients that join a base ending in "/" with a path starting with one send "//": served as
# nginx serves them (merge_slashes), and Orthanc too.
_SLASHES = re.compile(r"/{2,}")
#: The largest ``limit`` or ``offset`` passed on (PACS parse them as 32-bit integers).
PAGING_MAX = 2**31 - 1
#: The largest width or height of a rendered image passed on (``viewport``, WADO-URI ``rows``
#: and ``columns``): an 8K display's, and then some. Orthanc 1.10 drops the connection for a
#: side over JPEG's 65,500 pixels and dies outright on ``viewport=99999,99999``: no request
#: may take the PACS down.
RENDERED_MAX = 8192
# A BulkDataURI path below an instance: Orthanc's ``bulk/7fe00010`` or ``bulk/00540016/0/...``,
# dcm4chee's ``bulkdata/7FE00010``. Tags are 8 hex digits, item indices decimal.
_BULK_SEGMENT = re.compile(r"[0-9A-Fa-f]{8}|[0-9]{1,9}")
_QUERY_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,128}")

_READ_METHODS = ("GET", "HEAD", "OPTIONS")
_STORE_METHODS = ("GET", "HEAD", "POST", "OPTIONS")


def _uid(segment: str) -> str:
    if not is_uid(segment):
        raise NotFound("not a DICOMweb resource")
    return segment


def _frames(segment: str) -> tuple[int, ...]:
    if not _FRAMES.fullmatch(segment):
        if _NUMBERS.fullmatch(segment):
            raise BadRequest("frame numbers are from 1 to 999999999 (PS3.18 §8.3.5.1.1)")
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
        if word in _SEGMENT_LEVEL and _SEGMENT_LEVEL[word].depth > level.depth:
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
        if key in ("limit", "offset") and not (
            value.isascii() and value.isdigit() and len(value) <= 10 and int(value) <= PAGING_MAX
        ):
            raise BadRequest(f"{key} must be an integer from 0 to {PAGING_MAX}")
    return tuple(pairs)


class Route(NamedTuple):
    """A parsed route: the request, the methods its path allows, and for WADO-URI the
    ``Accept`` its ``contentType`` stands for."""

    request: DicomWebRequest
    allowed: tuple[str, ...]
    accept: bytes | None = None


def parse_route(scope: Scope, *, base_path: str) -> Route:
    """Parse an HTTP scope into a DICOMweb request and the methods its path allows.

    Raises NotFound for a path that is not a Studies Service route below ``base_path``,
    MethodNotAllowed for a method the route does not take, BadRequest for a broken query.
    """
    path = _SLASHES.sub("/", route_path(scope))
    if not path.startswith(base_path + "/"):
        raise NotFound("not a DICOMweb resource")
    segments = path[len(base_path) + 1 :].split("/")
    method = scope["method"]
    if segments == ["wado"]:
        if method not in _READ_METHODS:
            raise MethodNotAllowed(f"{method} is not allowed on this resource", allow=_READ_METHODS)
        query = _parse_query(scope.get("query_string", b""))
        request, accept = _wado_uri(method, query)
        return Route(request, _READ_METHODS, accept)
    request, allowed = _parse_path(method, segments)
    if method not in allowed:
        raise MethodNotAllowed(f"{method} is not allowed on this resource", allow=allowed)
    query = _parse_query(scope.get("query_string", b""))
    if query:
        if request.resource in (Resource.RENDERED, Resource.THUMBNAIL):
            for key, value in query:
                if key == "viewport":
                    _viewport(value)
        request = replace(request, query=query)
    return Route(request, allowed)


def _viewport(value: str) -> None:
    """PS3.18's ``vw,vh[,sx,sy,sw,sh]``: the size of the image answered comes first."""
    width, _, rest = value.partition(",")
    height = rest.partition(",")[0]
    for size in (width, height):
        if not (
            size.isascii() and size.isdigit() and len(size) <= 4 and 0 < int(size) <= RENDERED_MAX
        ):
            raise BadRequest(
                f"viewport starts with a width and a height from 1 to {RENDERED_MAX} pixels"
            )


#: WADO-URI content types served, as the WADO-RS resource that gives them.
_WADO_URI_TYPES = ("application/dicom", "image/jpeg", "image/png", "image/gif")
_WADO_URI_UNSUPPORTED = ("region", "presentationUID", "presentationSeriesUID")


def _wado_uri(method: str, query: tuple[tuple[str, str], ...]) -> tuple[DicomWebRequest, bytes]:
    """A WADO-URI request (PS3.18 §9) as the WADO-RS request it stands for, and its Accept:
    the instance (``application/dicom``) or its rendered image (a frame's, with ``frameNumber``)."""
    params: dict[str, str] = {}
    for key, value in query:
        params.setdefault(key, value)
    if params.get("requestType") != "WADO":
        raise BadRequest("WADO-URI needs requestType=WADO")
    uids = []
    for key in ("studyUID", "seriesUID", "objectUID"):
        value = params.get(key, "")
        if not is_uid(value):
            raise BadRequest(f"WADO-URI needs {key}, a UID")
        uids.append(value)
    study, series, instance = uids
    if params.get("anonymize", "no") != "no":
        raise BadRequest("anonymize is not supported")
    unsupported = [key for key in _WADO_URI_UNSUPPORTED if key in params]
    if unsupported:
        raise BadRequest(f"{unsupported[0]} is not supported")
    wanted = [m.type for m in split_accept(params.get("contentType", "image/jpeg"))]
    content_type = next(
        (t for t in wanted if t in _WADO_URI_TYPES), "image/jpeg" if "*/*" in wanted else None
    )
    if content_type is None:
        raise NotAcceptable(f"WADO-URI serves {', '.join(_WADO_URI_TYPES)}")
    if content_type == "application/dicom":
        accept = content_type
        syntax = params.get("transferSyntax")
        if syntax is not None:
            if not is_uid(syntax):
                raise BadRequest("transferSyntax must be a UID")
            accept += f"; transfer-syntax={syntax}"
        request = DicomWebRequest(
            method, Service.WADO_URI, Resource.RETRIEVE, Level.INSTANCE, study, series, instance
        )
        return request, accept.encode()
    rendered: list[tuple[str, str]] = []
    rows, columns = params.get("rows"), params.get("columns")
    if rows is not None or columns is not None:
        rendered.append(
            (
                "viewport",
                f"{_number('columns', columns or rows, top=RENDERED_MAX)},"
                f"{_number('rows', rows or columns, top=RENDERED_MAX)}",
            )
        )
    center, width = params.get("windowCenter"), params.get("windowWidth")
    if (center is None) != (width is None):
        raise BadRequest("windowCenter and windowWidth go together")
    if center is not None and width is not None:
        rendered.append(
            (
                "window",
                f"{_decimal('windowCenter', center)},{_decimal('windowWidth', width)},linear",
            )
        )
    if "imageQuality" in params:
        rendered.append(("quality", str(_number("imageQuality", params["imageQuality"], top=100))))
    frames = (_number("frameNumber", params["frameNumber"]),) if "frameNumber" in params else ()
    request = DicomWebRequest(
        method,
        Service.WADO_URI,
        Resource.RENDERED,
        Level.INSTANCE,
        study,
        series,
        instance,
        frames,
        query=tuple(rendered),
    )
    return request, content_type.encode()


def _number(key: str, value: str | None, *, top: int = 999_999_999) -> int:
    digits = value is not None and value.isascii() and value.isdigit() and len(value) <= 10
    if value is None or not digits or not 0 < int(value) <= top:
        raise BadRequest(f"{key} must be an integer from 1 to {top}")
    return int(value)


_DECIMAL = re.compile(r"[+-]?[0-9]{1,10}(?:\.[0-9]{1,10})?")


def _decimal(key: str, value: str) -> str:
    if not _DECIMAL.fullmatch(value):
        raise BadRequest(f"{key} must be a decimal number")
    return value


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


class RoutingMiddleware:
    """Parse the DICOMweb route; answer OPTIONS; refuse everything that is not a route.

    Puts a :class:`DicomWebRequest` in the scope for the layers below. An upload whose
    Content-Length exceeds ``max_upload_bytes`` is refused here (413), before anything else
    looks at it; the bytes of a chunked one are counted where it is read. Non-HTTP scopes pass
    straight through.
    """

    def __init__(
        self, app: ASGIApp, *, base_path: str = "", max_upload_bytes: int | None = None
    ) -> None:
        self.app = app
        self.base_path = base_path
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request, allowed, accept = parse_route(scope, base_path=self.base_path)
        if accept is not None:
            # WADO-URI names its content type in the query: the layers below read Accept.
            headers = [(n, v) for n, v in scope["headers"] if n.lower() != b"accept"]
            scope["headers"] = [*headers, (b"accept", accept)]
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
        if request.method == "POST":
            length, limit = content_length(scope), self.max_upload_bytes
            if length is not None and limit is not None and length > limit:
                raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
        set_dicomweb_request(scope, request)
        await self.app(scope, receive, send)
