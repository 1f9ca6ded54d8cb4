"""HTTP headers: what crosses the proxy in each direction, content types, the public base URL.

This module is the only place that decides which header goes where.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeGuard

from ._errors import BadRequest
from ._types import Headers, Scope

__all__ = [
    "LINK_HEADERS",
    "LOOPBACK",
    "MediaType",
    "TrustedProxies",
    "content_length",
    "header",
    "parse_media_type",
    "public_base_url",
    "request_headers_for_upstream",
    "response_headers_for_client",
    "split_accept",
    "wants_dicom_xml",
]

# Never passed on, whichever way (RFC 9110 §7.6.1); taken out of both lists below.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Forwarded upstream: content negotiation, conditional requests and tracing. Everything else
# (Authorization, Cookie, Host, Forwarded, X-Forwarded-*, hop-by-hop headers) stays here: the
# PACS sees the proxy as its only client.
_TO_UPSTREAM = (
    frozenset(
        {
            b"accept",
            b"accept-charset",
            b"accept-language",
            b"cache-control",
            b"content-type",
            b"if-match",
            b"if-modified-since",
            b"if-none-match",
            b"if-unmodified-since",
            b"range",
            b"user-agent",
            b"x-request-id",
        }
    )
    - _HOP_BY_HOP
)

# The client's own X-Request-ID is replaced by the proxy's when it has one.
_TO_UPSTREAM_BUT_ID = _TO_UPSTREAM - {b"x-request-id"}

# Passed back to the client. Set-Cookie, WWW-Authenticate (the PACS's own challenge), Server and
# hop-by-hop headers are dropped.
_TO_CLIENT = (
    frozenset(
        {
            b"accept-ranges",
            b"cache-control",
            b"content-disposition",
            b"content-encoding",
            b"content-language",
            b"content-length",
            b"content-location",
            b"content-range",
            b"content-type",
            b"etag",
            b"expires",
            b"last-modified",
            b"location",
            b"retry-after",
            b"vary",
            b"warning",
        }
    )
    - _HOP_BY_HOP
)

#: Response headers that hold a URL of the upstream, to be rewritten for the client.
LINK_HEADERS = frozenset({b"content-location", b"location"})


def _passed(headers: Iterable[tuple[bytes, bytes]], allowed: frozenset[bytes]) -> Headers:
    """The ``allowed`` headers (which hold no hop-by-hop name), names lower-cased, without
    those the ``Connection`` header lists: hop-by-hop too (RFC 9110 §7.6.1)."""
    kept: Headers = []
    listed: set[bytes] = set()
    for name, value in headers:
        name = name.lower()
        if name == b"connection":
            listed.update(t.strip().lower() for t in value.split(b","))
        elif name in allowed:
            kept.append((name, value))
    return [pair for pair in kept if pair[0] not in listed] if listed else kept


def request_headers_for_upstream(
    headers: Sequence[tuple[bytes, bytes]], *, request_id: str | None = None
) -> Headers:
    """The client's headers that may go upstream, names lower-cased.

    ``request_id`` (the proxy's id of the request) replaces the client's ``X-Request-ID``.
    """
    if request_id is None:
        return _passed(headers, _TO_UPSTREAM)
    result = _passed(headers, _TO_UPSTREAM_BUT_ID)
    result.append((b"x-request-id", request_id.encode("ascii")))
    return result


def response_headers_for_client(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """The upstream's headers that may go back to the client, names lower-cased."""
    return _passed(headers, _TO_CLIENT)


class MediaType:
    """A parsed ``Content-Type`` or ``Accept`` element: ``type/subtype`` plus parameters.

    Parsed values are cached and shared: never change one.
    """

    __slots__ = ("type", "params")

    def __init__(self, type: str, params: Mapping[str, str]) -> None:
        self.type = type
        self.params = params

    def __repr__(self) -> str:
        return f"MediaType({self.type!r}, {self.params!r})"

    @property
    def related_type(self) -> str:
        """The ``type=`` of a ``multipart/related`` value, lower-cased ("" if absent)."""
        return self.params.get("type", "").lower()


_PARAM = re.compile(r'\s*;\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,]*)')


@functools.lru_cache(maxsize=1024)
def parse_media_type(value: str) -> MediaType:
    """Parse one media type with its parameters (cached: a request's Accept, and the upstream's
    Content-Type that several layers read, are parsed once).

    Quoted and unquoted parameter values are both accepted: PS3.18 §8.7.3.5 quotes
    ``type="application/dicom"``, yet many clients send it unquoted (``type=application/dicom``),
    which is not even valid RFC 9110 syntax because of the ``/``.
    """
    head, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for match in _PARAM.finditer(";" + rest if rest else ""):
        raw = match.group(2).strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1]
            if "\\" in raw:
                raw = re.sub(r"\\(.)", r"\1", raw)
        params[match.group(1).lower()] = raw
    return MediaType(head.strip().lower(), params)


@functools.lru_cache(maxsize=256)
def split_accept(value: str) -> tuple[MediaType, ...]:
    """Split an ``Accept`` header into media ranges, honouring quoted commas (cached)."""
    if '"' not in value:  # the common case, on every request: no quoted parameter
        return tuple(parse_media_type(part) for part in value.split(",") if part.strip())
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return tuple(parse_media_type(part) for part in parts if part.strip())


_JSON_RANGES = frozenset({"application/dicom+json", "application/json", "application/*", "*/*"})


def wants_dicom_xml(scope: Scope) -> bool:
    """Whether the client's ``Accept`` asks for DICOM XML and accepts no DICOM JSON: how an
    answer the proxy writes itself (a filtered search, a STOW answer) is then encoded."""
    accept = header(scope, b"accept")
    if not accept:
        return False
    ranges = split_accept(accept.decode("latin-1"))
    xml = any(
        m.type == "application/dicom+xml"
        or (m.type == "multipart/related" and m.related_type == "application/dicom+xml")
        for m in ranges
    )
    return xml and not any(m.type in _JSON_RANGES for m in ranges)


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a request header, or None."""
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value)
    return None


def content_length(scope: Scope) -> int | None:
    """The request's Content-Length, or None when it has none; 400 when it is not a number."""
    value = header(scope, b"content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise BadRequest("invalid Content-Length")
    return int(value)


# A host name (labels of 1-63 letters, digits and hyphens) or an IP literal, then a port: what
# a Host or a forwarded host may be before a link is built on it, at most 253 + 6 characters.
_HOST = re.compile(
    r"(?:(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?|\[[0-9A-Fa-f:.]{2,45}\])"
    r"(?::[0-9]{1,5})?"
)
_MAX_HOST = 253 + len(":65535")
_FORWARDED_PAIR = re.compile(r'(?i)\b(host|proto)\s*=\s*("[^"]*"|[^;,]*)')


def _valid_host(host: str | None) -> TypeGuard[str]:
    return host is not None and _is_host(host)


@functools.lru_cache(maxsize=1024)  # a few hosts, each checked on every request with links
def _is_host(host: str) -> bool:
    return len(host) <= _MAX_HOST and _HOST.fullmatch(host) is not None


class TrustedProxies:
    """The peers whose ``Forwarded`` and ``X-Forwarded-*`` headers are believed
    (``[server] forwarded_allow_ips``): addresses, networks (``10.0.0.0/8``), or ``"*"`` for
    every peer. A request from anyone else is taken as it came: its forwarded headers are
    ignored, so a client cannot name the host links point to."""

    __slots__ = ("everyone", "networks", "_trusts_address")

    def __init__(self, allow: Iterable[str] = ("127.0.0.1", "::1")) -> None:
        allow = tuple(allow)
        self.everyone = "*" in allow
        self.networks = tuple(ipaddress.ip_network(a, strict=False) for a in allow if a != "*")
        # Parsing the peer's address costs 5 µs a request; peers are few and come back.
        self._trusts_address = functools.lru_cache(maxsize=4096)(self._address_trusted)

    def __repr__(self) -> str:
        shown = ["*"] if self.everyone else [str(n) for n in self.networks]
        return f"TrustedProxies({shown!r})"

    def trusts(self, scope: Scope) -> bool:
        """Whether the peer of the connection (``scope["client"]``) is one of them."""
        if self.everyone:
            return True
        client = scope.get("client")
        if not client:
            return False  # a Unix socket or an unknown peer
        return self._trusts_address(client[0])

    def _address_trusted(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


#: The default: the proxy's own machine only (a reverse proxy on the same host).
LOOPBACK = TrustedProxies()


def _forwarded(scope: Scope) -> tuple[str | None, str | None]:
    """Host and proto from the first element of RFC 7239 ``Forwarded``, else X-Forwarded-*."""
    host = proto = None
    value = header(scope, b"forwarded")
    if value is not None:
        first = value.decode("latin-1").split(",")[0]
        for key, raw in _FORWARDED_PAIR.findall(first):
            if key.lower() == "host":
                host = raw.strip().strip('"')
            else:
                proto = raw.strip().strip('"').lower()
    else:
        xf_host = header(scope, b"x-forwarded-host")
        xf_proto = header(scope, b"x-forwarded-proto")
        if xf_host is not None:
            host = xf_host.decode("latin-1").split(",")[0].strip()
        if xf_proto is not None:
            proto = xf_proto.decode("latin-1").split(",")[0].strip().lower()
    return host, proto


def public_base_url(
    scope: Scope, *, public_url: str, base_path: str, trusted: TrustedProxies = LOOPBACK
) -> str:
    """The absolute URL under which clients reach the DICOMweb service, without trailing slash.

    ``[server] public_url`` wins. Otherwise the URL is built from ``Forwarded`` (or
    ``X-Forwarded-Host``/``-Proto``) when the peer is one of the ``trusted`` proxies, then
    ``Host``, then the socket the request came in on. A host that is not a host name or an IP
    literal with an optional port, at most 259 characters, is ignored, so that nothing a client
    puts in a header ends up verbatim inside a JSON or XML body, nor makes it grow.
    """
    if public_url:
        return public_url
    host, proto = _forwarded(scope) if trusted.trusts(scope) else (None, None)
    if proto not in ("http", "https"):
        proto = scope.get("scheme", "http")
    server = scope.get("server")
    if not _valid_host(host):
        raw = header(scope, b"host")
        host = raw.decode("latin-1") if raw is not None else None
        if _valid_host(host) and server and not _has_port(host):
            # dicomweb-client 0.61 sends "Host: 127.0.0.1" without the port on some GETs;
            # links built from that point to port 80. Without a reverse proxy in front
            # (which would have sent Forwarded), the port the request came in on is right.
            if server[1] is not None and server[1] != _DEFAULT_PORTS.get(proto):
                host = f"{host}:{server[1]}"
    if not _valid_host(host):
        address, port = server or ("127.0.0.1", None)
        address = f"[{address}]" if ":" in str(address) else str(address)
        host = f"{address}:{port}" if port is not None else address
    return f"{proto}://{host}{scope.get('root_path', '')}{base_path}"


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _has_port(host: str) -> bool:
    return host.rsplit("]", 1)[-1].find(":") >= 0
