"""Signed links (DESIGN §5c, docs/links.md): read one examination with no header, for a while.

``POST {base_path}/links`` with ``{"study", "series"?, "action"?, "ttl"?}``, by an
authenticated caller who may do ``action`` on that examination, answers ``{"url",
"expires"}``: ``url`` is a DICOMweb root, ``{public base}/links/{token}``, under which the
read routes of that study (of that acquisition only, with ``series``) answer without any
header until ``expires``. The token is a compact JWS (HS256) of the link's grant, signed with
the newest of ``[links] keys_file`` and checked against all of them.

Two ASGI layers: :class:`SignedLinks` goes outside authentication (it turns a link's path
into the plain route, with a principal that holds only the link's grant), :class:`LinkIssuer`
inside it (it answers the POST). The token never goes upstream (the upstream path is rebuilt
from the parsed route), and nothing of it is logged: the access log holds no path, and the
audit log names the link's issuer, not the token.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import orjson
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, OctKey

from ._access import AccessPolicy, Action, AuditLog
from ._errors import BadRequest, ConfigError, MethodNotAllowed, NotFound, ProxyError
from ._headers import TrustedProxies, header, parse_media_type, public_base_url
from ._identifiers import IdentifierMap, UidFormatter
from ._problems import send_json
from ._scope import LinkGrant, Principal, get_principal, get_record, route_path, set_principal
from ._types import ASGIApp, Receive, Scope, Send

__all__ = ["LinkIssuer", "LinkKeys", "LinkRefused", "SignedLinks"]

_SEGMENT: Final = "/links"
_ALGORITHM: Final = "HS256"
#: The largest body ``POST /links`` reads.
_MAX_REQUEST: Final = 4096


class LinkRefused(ProxyError):
    """A link that is malformed, signed by no current key, or expired (401)."""

    status = 401
    code = "invalid_link"


class LinkKeys:
    """The keys of ``[links] keys_file``: a JSON Web Key Set of ``oct`` keys (32 bytes or
    more, each with a ``kid``), the newest first. The newest signs; all verify."""

    def __init__(self, keys: list[OctKey]) -> None:
        if not keys:
            raise ValueError("no key")
        self._keys = keys
        self._set = KeySet(list(keys))

    @classmethod
    def load(cls, path: str) -> LinkKeys:
        """Read ``path``; a ConfigError says what is wrong with it, never a key."""
        where = f"[links] keys_file: {path}"
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            reason = type(exc).__name__
            raise ConfigError(f"{where}: cannot read a JSON Web Key Set ({reason})") from None
        entries = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f'{where}: expected {{"keys": [...]}} with at least one key')
        keys: list[OctKey] = []
        for number, entry in enumerate(entries, start=1):
            if not isinstance(entry, dict) or entry.get("kty") != "oct" or not entry.get("kid"):
                raise ConfigError(f'{where}: key {number} is not an "oct" key with a "kid"')
            try:
                key = OctKey.import_key(entry)
            except (JoseError, ValueError):
                raise ConfigError(f"{where}: key {number} cannot be read") from None
            if len(key.raw_value) < 32:
                raise ConfigError(f"{where}: key {number} is shorter than 32 bytes")
            keys.append(key)
        return cls(keys)

    def sign(self, claims: Mapping[str, Any]) -> str:
        newest = self._keys[0]
        header = {"alg": _ALGORITHM, "kid": newest.kid}
        token: str = jws.serialize_compact(header, orjson.dumps(dict(claims)), newest)
        return token

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a token signed by one of the keys; LinkRefused otherwise."""
        try:
            signed = jws.deserialize_compact(token, self._set, algorithms=[_ALGORITHM])
            claims = orjson.loads(signed.payload)
        except (JoseError, ValueError, orjson.JSONDecodeError):
            raise LinkRefused("this link is not valid (or its key was withdrawn)") from None
        if not isinstance(claims, dict):
            raise LinkRefused("this link is not valid (or its key was withdrawn)")
        return claims


class SignedLinks:
    """Outside authentication: a request under ``{base_path}/links/{token}/`` is served as the
    route after the token, for a principal that holds only the link's grant (reads: GET,
    HEAD). The token's path segment is taken out of the scope's path; links in answers put it
    back. Other requests pass as they are."""

    def __init__(self, app: ASGIApp, *, keys: LinkKeys, base_path: str) -> None:
        self.app = app
        self.keys = keys
        self.prefix = base_path + _SEGMENT + "/"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if not path.startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        token, slash, rest = path[len(self.prefix) :].partition("/")
        if not slash:
            raise NotFound("not a DICOMweb resource")
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            raise MethodNotAllowed("a link only reads", allow=("GET", "HEAD", "OPTIONS"))
        grant = _grant(self.keys.verify(token), f"{_SEGMENT}/{token}")
        base = self.prefix[: -len(_SEGMENT) - 1]
        root = scope.get("root_path", "")
        inner = {
            **scope,
            "path": f"{root}{base}/{rest}",
            "raw_path": f"{root}{base}/{rest}".encode(),
            # A link stands alone: whatever credentials came with it are not looked at.
            "headers": [
                (n, v) for n, v in scope["headers"] if n not in (b"authorization", b"cookie")
            ],
        }
        subject = f"link:{grant.issuer}"
        principal = Principal(
            subject=subject,
            user_id=None,
            username=None,
            roles=frozenset(),
            claims={},
            expires_at=grant.expires_at,
            is_admin=False,
            token_id=hashlib.sha256(token.encode()).hexdigest()[:12],
            link=grant,
        )
        record = get_record(scope)
        if record is not None:
            record.subject, record.user_id = subject, None
        set_principal(inner, principal)
        await self.app(inner, receive, send)


def _grant(claims: Mapping[str, Any], prefix: str) -> LinkGrant:
    exam, series, action = claims.get("exam"), claims.get("series"), claims.get("act")
    expires, issuer = claims.get("exp"), claims.get("iss")
    if (
        not isinstance(exam, int)
        or not (series is None or isinstance(series, str))
        or action not in ("read", "download")
        or not isinstance(expires, int)
        or not isinstance(issuer, str)
    ):
        raise LinkRefused("this link is not valid (or its key was withdrawn)")
    if expires <= time.time():
        raise LinkRefused("this link has expired")
    return LinkGrant(exam, series, action, float(expires), issuer, prefix)


class LinkIssuer:
    """Inside authentication: ``POST {base_path}/links`` makes a link for the caller, who
    must be allowed ``action`` on the examination (and the series must be one of its
    acquisitions); 404 otherwise, as for any study the caller may not see."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: LinkKeys,
        policy: AccessPolicy,
        identifiers: IdentifierMap,
        formatter: UidFormatter,
        max_ttl: int,
        base_path: str,
        public_url: str,
        trusted: TrustedProxies,
        audit: AuditLog | None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.policy = policy
        self.identifiers = identifiers
        self.formatter = formatter
        self.max_ttl = max_ttl
        self.base_path = base_path
        self.public_url = public_url
        self.trusted = trusted
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) != self.base_path + _SEGMENT:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            raise MethodNotAllowed("links are made with POST", allow=("POST",))
        principal = get_principal(scope)
        if principal is None or principal.link is not None:
            raise NotFound("not a DICOMweb resource")  # no links from links
        content_type = header(scope, b"content-type") or b""
        if parse_media_type(content_type.decode("latin-1")).type != "application/json":
            raise BadRequest("POST /links takes application/json")
        study, series, action, ttl = _link_request(await _read_json(receive))
        exam = self.formatter.exam_id(study)
        allowed = await self.policy.allowed(principal, action, [exam]) if exam else ()
        if exam is None or exam not in allowed:
            raise NotFound("no such study")
        if series is not None:
            acquisition = self.formatter.acquisition_id(series)
            entries = await self.identifiers.series_by_id([acquisition]) if acquisition else {}
            entry = entries.get(acquisition) if acquisition else None
            if entry is None or entry.exam_id != exam:
                raise NotFound("no such series")
        expires = int(time.time()) + min(ttl or self.max_ttl, self.max_ttl)
        claims = {
            "exam": exam,
            "series": series,
            "act": action,
            "exp": expires,
            "iss": principal.subject,
        }
        token = self.keys.sign(claims)
        base = public_base_url(
            scope, public_url=self.public_url, base_path=self.base_path, trusted=self.trusted
        )
        if self.audit is not None:
            entry_ = {"event": "link", "subject": principal.subject, "user_id": principal.user_id}
            self.audit.write(
                {
                    **entry_,
                    "examinations": [exam],
                    "series": series,
                    "action": action,
                    "expires": expires,
                }
            )
        await send_json(
            send,
            201,
            {"url": f"{base}{_SEGMENT}/{token}", "expires": expires},
            headers=[(b"content-type", b"application/json"), (b"cache-control", b"no-store")],
        )


def _link_request(data: object) -> tuple[str, str | None, Action, int | None]:
    if not isinstance(data, dict):
        raise BadRequest('expected {"study": ..., "series": ..., "action": ..., "ttl": ...}')
    unknown = set(data) - {"study", "series", "action", "ttl"}
    if unknown:
        raise BadRequest(f"unknown key {sorted(unknown)[0]!r}")
    study, series = data.get("study"), data.get("series")
    action, ttl = data.get("action", "read"), data.get("ttl")
    if not isinstance(study, str) or not (series is None or isinstance(series, str)):
        raise BadRequest("study (and series) must be public UIDs")
    if action not in ("read", "download"):
        raise BadRequest('action must be "read" or "download"')
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0):
        raise BadRequest("ttl must be a positive number of seconds")
    return study, series, action, ttl


async def _read_json(receive: Receive) -> object:
    body = b""
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("the request body ended early")
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > _MAX_REQUEST:
            raise BadRequest(f"the request body exceeds {_MAX_REQUEST} bytes")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("the request body is not JSON") from None
