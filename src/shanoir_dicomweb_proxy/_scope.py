"""The scope contract: what the layers of one request tell each other (DESIGN §2).

The layers are pure ASGI middlewares that never import one another: they speak through the
ASGI scope, under the keys of this module and only through its accessors.

=================  ==============================================  =========================
what               written by                                      read by
=================  ==============================================  =========================
request record     observability (:class:`RequestRecord`)          auth, access, upstream note
                                                                   on it what only they know
principal          auth (:class:`Principal`)                       access; backends acting on
                                                                   the caller's behalf
                                                                   (:func:`current_principal`)
DICOMweb request   routing; access narrows a search; rewrite       access, rewrite, upstream,
                   addresses the upstream's UIDs                   observability (its route)
visibility         access: which examinations the caller may read  rewrite (answers)
upstream rows      access, paging through the upstream itself      rewrite (counts the rows)
write check        access: where the caller may write              STOW (per instance)
instance audit     access: the audit line of the request           STOW (one line per instance)
=================  ==============================================  =========================

Each accessor returns None (or raises, for the DICOMweb request, which routing always sets)
when the layer that writes its key is not in the stack.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final

from ._request import DicomWebRequest
from ._types import Scope

__all__ = [
    "InstanceAudit",
    "LinkGrant",
    "Principal",
    "RequestRecord",
    "Visibility",
    "WriteCheck",
    "count_upstream_rows",
    "current_principal",
    "find_dicomweb_request",
    "get_dicomweb_request",
    "get_instance_audit",
    "get_principal",
    "get_record",
    "get_upstream_rows",
    "get_visibility",
    "get_write_check",
    "link_prefix",
    "route_path",
    "set_dicomweb_request",
    "set_instance_audit",
    "set_principal",
    "set_record",
    "set_visibility",
    "set_write_check",
]

_PREFIX: Final = "shanoir_dicomweb_proxy."
_RECORD: Final = _PREFIX + "record"
_PRINCIPAL: Final = _PREFIX + "principal"
_REQUEST: Final = _PREFIX + "request"
_VISIBILITY: Final = _PREFIX + "visibility"
_UPSTREAM_ROWS: Final = _PREFIX + "upstream_rows"
_WRITE_CHECK: Final = _PREFIX + "write_check"
_INSTANCE_AUDIT: Final = _PREFIX + "instance_audit"

#: Which examinations the caller may see: given examination IDs, the visible ones.
Visibility = Callable[[frozenset[int]], Awaitable[Collection[int]]]
#: Given examination IDs, those the caller may write into.
WriteCheck = Callable[[frozenset[int]], Awaitable[Collection[int]]]
#: Write one audit line about one instance (fields added to the request's line).
InstanceAudit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class LinkGrant:
    """What a signed link grants: ``action`` (``read`` or ``download``) on examination
    ``exam``, on its acquisition ``series`` (a public series UID) only when set, until
    ``expires_at``. ``issuer`` is the subject who asked for it (for the audit log); ``prefix``
    is the link's path segment (``/links/{token}``), which links in answers keep so that they
    work without a header too: it never goes upstream, into a log or into a ``repr``."""

    exam: int
    series: str | None
    action: str
    expires_at: float
    issuer: str
    prefix: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, from a validated token.

    ``user_id`` comes from ``[auth] user_claim`` (Shanoir's ``userId``), ``roles`` from
    ``[auth] roles_claim`` (plus client roles when ``client_roles`` is set), ``expires_at`` is the
    token's ``exp`` (seconds since the epoch). ``token_id`` is a short hash of the token: the
    only trace of it that may be logged. ``token`` is the bearer token itself, for a backend
    that asks its platform on the caller's behalf (``[shanoir] credentials = "user"``): it never
    goes to the PACS, into a log or into a ``repr``.
    """

    subject: str
    user_id: str | None
    username: str | None
    roles: frozenset[str]
    claims: Mapping[str, Any] = field(repr=False)
    expires_at: float | None
    is_admin: bool
    token_id: str
    token: str = field(default="", repr=False, compare=False)
    #: Set for a request made with a signed link: then only what it grants is allowed.
    link: LinkGrant | None = None


def link_prefix(scope: Scope) -> str:
    """The path segment of the signed link this request came with ("" without one): public
    links in its answers carry it."""
    principal = get_principal(scope)
    return principal.link.prefix if principal is not None and principal.link is not None else ""


class RequestRecord:
    """What one request's layers note for its access log line and its metrics.

    The observability layer makes it; inner layers set what only they know: ``subject`` and
    ``user_id`` (auth), ``token_failure`` (why a token was refused: ``missing``, ``malformed``,
    ``expired``, ``bad_signature``, ...), ``decision`` (the access outcome: ``allow``,
    ``deny``, ``admin``, ``filter``, ``per-instance``, ``error``) and ``upstream_seconds`` (time
    spent on upstream requests, summed). Nothing that names a patient is ever recorded: no
    path, no query, no UID, no token.
    """

    __slots__ = (
        "request_id",
        "method",
        "route",
        "status",
        "bytes_in",
        "bytes_out",
        "seconds",
        "upstream_seconds",
        "subject",
        "user_id",
        "decision",
        "token_failure",
    )

    #: The route kind of a request that routing did not parse (refused before it, or not a route).
    OTHER_ROUTE: Final = "other"

    def __init__(self, request_id: str, method: str) -> None:
        self.request_id = request_id
        self.method = method
        self.route = self.OTHER_ROUTE
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.seconds = 0.0
        self.upstream_seconds = 0.0
        self.subject: str | None = None
        self.user_id: str | None = None
        self.decision: str | None = None
        self.token_failure: str | None = None


def route_path(scope: Scope) -> str:
    """The request path below the mount point (``root_path``) of this app."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    return path[len(root_path) :] if root_path and path.startswith(root_path) else path


def get_record(scope: Scope) -> RequestRecord | None:
    """The record of this request, when the observability layer runs."""
    record: RequestRecord | None = scope.get(_RECORD)
    return record


def set_record(scope: Scope, record: RequestRecord) -> None:
    scope[_RECORD] = record


def get_principal(scope: Scope) -> Principal | None:
    """The principal the auth layer put in this scope, if any."""
    principal: Principal | None = scope.get(_PRINCIPAL)
    return principal


def set_principal(scope: Scope, principal: Principal) -> None:
    """Put the caller in the scope, and make it :func:`current_principal` for the rest of the
    request (the code it awaits, and the tasks that code starts)."""
    scope[_PRINCIPAL] = principal
    _CURRENT.set(principal)


_CURRENT: ContextVar[Principal | None] = ContextVar(
    "shanoir_dicomweb_proxy.principal", default=None
)


def current_principal() -> Principal | None:
    """The caller of the request being served, for a backend that is not handed one (an
    identifier map acting on the caller's behalf); None outside a request with a principal."""
    return _CURRENT.get()


def get_dicomweb_request(scope: Scope) -> DicomWebRequest:
    """The request parsed by the routing layer for this scope."""
    request: DicomWebRequest = scope[_REQUEST]
    return request


def find_dicomweb_request(scope: Scope) -> DicomWebRequest | None:
    """The parsed request, or None when routing has not (yet, or ever) parsed one."""
    request: DicomWebRequest | None = scope.get(_REQUEST)
    return request


def set_dicomweb_request(scope: Scope, request: DicomWebRequest) -> None:
    """Put (or replace) the parsed request: routing does, then access and rewrite refine it."""
    scope[_REQUEST] = request


def get_visibility(scope: Scope) -> Visibility | None:
    return scope.get(_VISIBILITY)


def set_visibility(scope: Scope, visibility: Visibility) -> None:
    """Restrict what the rewrite layer shows in this request to visible examinations: a
    dataset or reference of any other is treated like one of an unknown study."""
    scope[_VISIBILITY] = visibility


def count_upstream_rows(scope: Scope) -> list[int]:
    """A counter of the rows of the upstream's answer to this request, dropped or not
    (``counter[0]``), for a caller that pages through the upstream itself."""
    counter = [0]
    scope[_UPSTREAM_ROWS] = counter
    return counter


def get_upstream_rows(scope: Scope) -> list[int] | None:
    """The counter :func:`count_upstream_rows` set, for the layer that sees the rows."""
    return scope.get(_UPSTREAM_ROWS)


def get_write_check(scope: Scope) -> WriteCheck | None:
    return scope.get(_WRITE_CHECK)


def set_write_check(scope: Scope, check: WriteCheck) -> None:
    """Restrict what an upload may store in this request to examinations ``check`` allows."""
    scope[_WRITE_CHECK] = check


def get_instance_audit(scope: Scope) -> InstanceAudit | None:
    return scope.get(_INSTANCE_AUDIT)


def set_instance_audit(scope: Scope, audit: InstanceAudit) -> None:
    """Have an upload audit each of its instances through ``audit``."""
    scope[_INSTANCE_AUDIT] = audit
