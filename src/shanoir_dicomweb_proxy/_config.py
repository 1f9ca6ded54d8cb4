"""Configuration: one TOML file into frozen, keyword-only settings classes.

Every settings class coerces and validates its own fields in ``__post_init__``, so a file, a
dict and direct keyword construction are all checked the same way. The loader adds what only a
file knows: unknown keys, missing required keys, and paths relative to the file's directory.
Every problem is a one-line :class:`ConfigError` naming the file, the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import functools
import grp
import ipaddress
import json
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

from ._errors import ConfigError

__all__ = [
    "AccessSettings",
    "AuthSettings",
    "CorsSettings",
    "IntrospectionSettings",
    "LinksSettings",
    "LoggingSettings",
    "MappingSettings",
    "ServerSettings",
    "Settings",
    "ShanoirServiceSettings",
    "ShanoirSettings",
    "StoreSettings",
    "UpstreamAuthSettings",
    "UpstreamSettings",
]

_SECRET: Mapping[str, Any] = {"secret": True}
_PATH: Mapping[str, Any] = {"path": True}
# A file the proxy writes: a relative path is taken from the state directory.
_STATE_PATH: Mapping[str, Any] = {"path": True, "state": True}
# Where systemd's StateDirectory= (and the container image) say the proxy keeps its files.
_STATE_DIRECTORY_ENV = "STATE_DIRECTORY"


def _secret_file(secret: str) -> Mapping[str, Any]:
    """The metadata of ``SECRET_file``: a file whose content is the secret ``secret``."""
    return {"path": True, "secret_file": secret}


# A secret written as "${NAME}" is read from the environment variable NAME.
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

_ASYMMETRIC_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
# root + "." + a 20-digit ID (the largest unsigned 64-bit integer) must fit in a 64-char UID.
_MAX_ROOT_LENGTH = 64 - 1 - 20

_UID_ROOT = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_HOSTNAME = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_PORT = re.compile(r"[0-9]{1,5}")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: header and method names
_BEARER = re.compile(r"[\x21-\x7e]+")  # what an Authorization header can carry


class _Mismatch(Exception):
    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


class _Section:
    """Shared behaviour of the settings classes: coercion, validation, repr, to_dict."""

    __slots__ = ()
    _section: ClassVar[str]

    def __post_init__(self) -> None:
        for f, hint in _fields(type(self)):
            value = getattr(self, f.name)
            try:
                coerced = _coerce(hint, value)
            except _Mismatch as exc:
                got = _describe(value, secret=bool(f.metadata.get("secret")))
                raise self._error(f.name, f"expected {exc.expected}, got {got}") from None
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        self._read_secrets()
        self._validate()

    def _read_secrets(self) -> None:
        """Secrets written as ``"${NAME}"`` from the environment; each ``SECRET_file`` into
        its secret, unless that is given too (then the value given wins). Errors name the key,
        the variable or the file, never a value."""
        for f, _ in _fields(type(self)):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and isinstance(value, str):
                match = _ENV_REFERENCE.fullmatch(value)
                if match:
                    name = match.group(1)
                    if name not in os.environ:
                        raise self._error(f.name, f"the environment variable {name} is not set")
                    object.__setattr__(self, f.name, os.environ[name])
        for f, _ in _fields(type(self)):
            target = f.metadata.get("secret_file")
            path = getattr(self, f.name)
            if target and path and not getattr(self, target):
                object.__setattr__(self, target, self._read_secret_file(f.name, path))

    def _read_secret_file(self, name: str, path: str) -> str:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read(65536).rstrip()
        except OSError as exc:
            raise self._error(name, f"cannot read {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise self._error(name, f"{path}: not UTF-8 text") from None
        if not text:
            raise self._error(name, f"{path} is empty")
        return text

    def _validate(self) -> None:
        pass

    def _error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{_where(self._section, key)}: {message}")

    def _check(self, name: str, check: Callable[[Any], object]) -> None:
        """Run ``check`` on a field; it returns the normalised value or raises ValueError."""
        try:
            value = check(getattr(self, name))
        except ValueError as exc:
            raise self._error(name, str(exc)) from None
        object.__setattr__(self, name, value)

    def _require(self, condition: bool, name: str, message: str) -> None:
        if not condition:
            raise self._error(name, message)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tables, lists, scalars) as a file would hold it; secrets are "***"."""
        data: dict[str, Any] = {}
        for f, _ in _fields(type(self)):
            if not f.metadata.get("file", True):
                continue
            value = getattr(self, f.name)
            if value is None:
                continue  # TOML has no null: an absent optional table
            if isinstance(value, _Section):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            elif f.metadata.get("secret") and value:
                value = "***"
            data[f.name] = value
        return data

    def __repr__(self) -> str:
        # Only what differs from the defaults, so the repr reads like the file that made it.
        parts = []
        for f, _ in _fields(type(self)):
            if not f.metadata.get("file", True):
                continue
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            shown = "'***'" if f.metadata.get("secret") and value else repr(value)
            parts.append(f"{f.name}={shown}")
        return f"{type(self).__name__}({', '.join(parts)})"


_S = TypeVar("_S", bound=_Section)

Transport = Literal["httpx", "aiohttp"]
Engine = Literal["hypercorn", "uvicorn"]
EventLoop = Literal["auto", "asyncio", "uvloop"]
UpstreamAuthType = Literal["none", "basic", "bearer", "client_credentials"]
MappingBackend = Literal["sqlite", "static", "http", "shanoir", "identity"]
AccessBackend = Literal["sqlite", "static", "http", "shanoir", "allow_all"]


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class ServerSettings(_Section):
    """``[server]``: where the proxy listens and how it names itself."""

    _section = "server"

    #: `HOST:PORT` to listen on (`[::1]:8080` for IPv6); `serve --bind` overrides it.
    bind: str = "127.0.0.1:8080"
    #: Where the DICOMweb service is served (`/dicomweb/studies`, …); `""` serves it at the root.
    base_path: str = "/dicomweb"
    #: The URL under which clients reach the DICOMweb service, mount path and `base_path` included
    #: (`https://pacs.example.org/dicomweb`): links in answers are built on it. `""` builds them
    #: from the request ([links](behaviour.md#links)); set it behind a reverse proxy.
    public_url: str = ""
    #: The peers whose `Forwarded` and `X-Forwarded-Host`/`-Proto` headers are believed when links
    #: are built from the request (`public_url = ""`): addresses or networks (`"10.0.0.0/8"`), or
    #: `["*"]` for every peer (only when nothing but the reverse proxy can reach the proxy).
    #: Other clients' forwarded headers are ignored
    #: ([forwarded headers](deployment.md#forwarded-headers)).
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1")
    #: STOW-RS bodies larger than this (4 GiB by default) are answered 413 and nothing is stored.
    max_upload_bytes: int = 4294967296
    #: Where the liveness probe answers, at the server root outside ``base_path``; "" = off.
    healthz_path: str = "/healthz"
    #: Where the readiness probe answers (upstream, issuer and store checked); "" = off.
    readyz_path: str = "/readyz"
    #: Where Prometheus metrics are served; "" = off.
    metrics_path: str = "/metrics"
    #: Seconds each readiness check may take before it counts as failing.
    ready_timeout: float = 2.0
    #: Seconds in-flight requests may take to finish after SIGTERM before they are cut.
    shutdown_grace: float = 30.0
    #: The HTTP server `serve` runs: `"hypercorn"` (HTTP/1.1 and h2c) or `"uvicorn"` (HTTP/1.1
    #: only, and the lighter of the two: ~0.15 ms less CPU per request;
    #: [performance](scaling.md#performance)). Both parse HTTP/1.1 with httptools.
    engine: Engine = "hypercorn"
    #: The event loop of `serve`: `"auto"` takes uvloop when it is installed (it is a dependency
    #: on Linux and macOS), else asyncio's own.
    loop: EventLoop = "auto"

    @property
    def host(self) -> str:
        """The host part of ``bind``, without IPv6 brackets."""
        return _split_bind(self.bind)[0]

    @property
    def port(self) -> int:
        """The port part of ``bind``."""
        return _split_bind(self.bind)[1]

    def _validate(self) -> None:
        self._check("bind", _bind)
        self._check("base_path", _base_path)
        self._check("public_url", lambda v: v and _http_url(v))
        self._check("forwarded_allow_ips", _peers)
        self._require(self.max_upload_bytes > 0, "max_upload_bytes", "must be > 0")
        for name in ("healthz_path", "readyz_path", "metrics_path"):
            self._check(name, _probe_path)
        probes = [p for p in (self.healthz_path, self.readyz_path, self.metrics_path) if p]
        self._require(
            len(set(probes)) == len(probes),
            "metrics_path",
            "healthz_path, readyz_path and metrics_path must differ",
        )
        self._require(self.ready_timeout > 0, "ready_timeout", "must be > 0")
        self._require(self.shutdown_grace >= 0, "shutdown_grace", "must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class UpstreamAuthSettings(_Section):
    """``[upstream.auth]``: how the proxy authenticates to the PACS."""

    _section = "upstream.auth"
    _USED_BY: ClassVar[Mapping[str, str]] = {
        # The files first: a file's secret is read before this check, which names the file.
        "password_file": "basic",
        "token_file": "bearer",
        "client_secret_file": "client_credentials",
        "username": "basic",
        "password": "basic",
        "token": "bearer",
        "token_url": "client_credentials",
        "client_id": "client_credentials",
        "client_secret": "client_credentials",
        "scope": "client_credentials",
    }

    #: `"none"`: no credentials; `"basic"`: `username` and `password`; `"bearer"`: a fixed `token`;
    #: `"client_credentials"`: the proxy gets its own token from `token_url` with `client_id` and
    #: `client_secret` (OAuth 2.0 client credentials, the client authenticated with HTTP Basic),
    #: shares it across requests, renews it 30 s before it expires and once more when the PACS
    #: answers 401. A key of another type is an error.
    type: UpstreamAuthType = "none"
    #: The user name, with `type = "basic"`.
    username: str = ""
    #: The password, with `type = "basic"` ([secrets](deployment.md#secrets): or `password_file`,
    #: or `"${VARIABLE}"`).
    password: str = field(default="", repr=False, metadata=_SECRET)
    #: A file holding the password (a Kubernetes Secret, a systemd credential).
    password_file: str = field(default="", metadata=_secret_file("password"))
    #: The token sent as `Authorization: Bearer …`, with `type = "bearer"`; never renewed.
    token: str = field(default="", repr=False, metadata=_SECRET)
    #: A file holding the token.
    token_file: str = field(default="", metadata=_secret_file("token"))
    #: The token endpoint, with `type = "client_credentials"` (Keycloak:
    #: `https://HOST/realms/REALM/protocol/openid-connect/token`).
    token_url: str = ""
    #: The proxy's client at `token_url`, with `type = "client_credentials"`.
    client_id: str = ""
    #: That client's secret, with `type = "client_credentials"`.
    client_secret: str = field(default="", repr=False, metadata=_SECRET)
    #: A file holding the client's secret.
    client_secret_file: str = field(default="", metadata=_secret_file("client_secret"))
    #: The `scope` asked for with the token, with `type = "client_credentials"`; `""` asks for none.
    scope: str = ""

    def _validate(self) -> None:
        missing = [
            name
            for name, owner in self._USED_BY.items()
            if owner == self.type
            and name != "scope"
            and not name.endswith("_file")
            and not getattr(self, name)
        ]
        if missing:
            raise self._error(", ".join(missing), f'required when type = "{self.type}"')
        # A credential the chosen type ignores is most likely a forgotten or mistyped type.
        for name, owner in self._USED_BY.items():
            if owner != self.type and getattr(self, name):
                raise self._error(name, f'only used with type = "{owner}" (type is "{self.type}")')
        if self.token_url:
            self._check("token_url", lambda v: _http_url(v, keep_slash=True, query=True))


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class UpstreamSettings(_Section):
    """``[upstream]``: the DICOMweb PACS behind the proxy and the client that reaches it."""

    _section = "upstream"

    #: The PACS's DICOMweb root: `http://127.0.0.1:8042/dicom-web` (Orthanc),
    #: `http://dcm4chee:8080/dcm4chee-arc/aets/DCM4CHEE/rs` (dcm4chee-arc-light); no credentials in
    #: it (they go in `[upstream.auth]`).
    url: str
    #: Seconds to open a connection to the PACS (then 502).
    connect_timeout: float = 5.0
    #: Seconds the PACS may stay silent, before the first byte or between two (then 504, or an
    #: aborted response once the answer has begun).
    read_timeout: float = 300.0
    #: Seconds a write to the PACS may block (`transport = "httpx"` only; aiohttp has no such
    #: timeout).
    write_timeout: float = 300.0
    #: Seconds a request may wait for a free connection when `max_connections` are all busy.
    pool_timeout: float = 10.0
    #: Connections to the PACS at most, per worker process.
    max_connections: int = 64
    #: Idle connections kept for reuse, per worker process (`transport = "httpx"`, and the GETs of
    #: `"aiohttp"`; its other requests keep any idle connection up to `max_connections`).
    max_keepalive_connections: int = 16
    #: Seconds an idle connection is kept for reuse. Orthanc closes idle connections after 1 s:
    #: reusing one just as it closes fails the request, so stay below that.
    keepalive_expiry: float = 0.5
    #: How bytes move to and from the PACS: `"aiohttp"` (reads up to 1 MiB at a time; forwarded
    #: GETs, most requests, go through the proxy's own HTTP/1.1 client on httptools, at a quarter
    #: of aiohttp's CPU per request) or `"httpx"` (httpx's own transport); on the project's
    #: machines aiohttp moved ~1.8× the bytes and ~2× the small requests (`bench/`).
    transport: Transport = "aiohttp"
    #: Send the admitted instances of a translated upload (STOW-RS with a `[mapping]` backend other
    #: than `"identity"`) to the PACS while the upload still arrives, instead of once it has
    #: arrived whole; only when the client sent a `Content-Length`. Only for a PACS that stores
    #: nothing of a request whose body ends before its `Content-Length` (Orthanc; not
    #: dcm4chee-arc-light, which stores each part as it reads it): a malformed, truncated or
    #: oversized upload is then cut off mid-body ([uploads](uploads.md#streaming-to-the-pacs)).
    stream_uploads: bool = False
    #: How the proxy authenticates to the PACS. Clients' `Authorization` headers never go upstream.
    auth: UpstreamAuthSettings = field(default_factory=UpstreamAuthSettings)

    def _validate(self) -> None:
        self._check("url", lambda v: _http_url(v, hint="; put them in [upstream.auth]"))
        for name in ("connect_timeout", "read_timeout", "write_timeout", "pool_timeout"):
            self._require(getattr(self, name) > 0, name, "must be > 0")
        self._require(self.max_connections > 0, "max_connections", "must be > 0")
        self._require(
            0 <= self.max_keepalive_connections <= self.max_connections,
            "max_keepalive_connections",
            f"must be between 0 and max_connections ({self.max_connections})",
        )
        self._require(self.keepalive_expiry >= 0, "keepalive_expiry", "must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class IntrospectionSettings(_Section):
    """``[auth.introspection]``: an RFC 7662 endpoint for opaque tokens."""

    _section = "auth.introspection"

    #: The RFC 7662 introspection endpoint (Keycloak:
    #: `https://HOST/realms/REALM/protocol/openid-connect/token/introspect`).
    url: str
    #: The proxy's own client at the issuer, authenticated with HTTP Basic.
    client_id: str
    #: That client's secret (or `client_secret_file`); required.
    client_secret: str = field(default="", repr=False, metadata=_SECRET)
    #: A file holding the client's secret.
    client_secret_file: str = field(default="", metadata=_secret_file("client_secret"))
    #: Seconds an answer is reused, never past the token's `exp`.
    cache_ttl: int = 60

    def _validate(self) -> None:
        self._check("url", lambda v: _http_url(v, keep_slash=True, query=True))
        self._require(bool(self.client_id), "client_id", "must not be empty")
        self._require(bool(self.client_secret), "client_secret", "required (or client_secret_file)")
        self._require(self.cache_ttl >= 0, "cache_ttl", "must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class AuthSettings(_Section):
    """``[auth]``: how client bearer tokens are checked."""

    _section = "auth"

    #: `false` serves requests without a token, with a loud warning at each start: only for a host
    #: application that authenticates requests itself, or trials on a trusted machine.
    enabled: bool = True
    #: The issuer, exactly as in the tokens' `iss` (Keycloak: `https://HOST/realms/REALM`, or
    #: `https://HOST/auth/realms/REALM` where it runs under `/auth`); its discovery document gives
    #: the keys' URL. `""`: `iss` is not checked. While `enabled`, one of `issuer`, `jwks_url`,
    #: `jwks_file` or `[auth.introspection]` is required.
    issuer: str = ""
    #: A string or a list: a token must name one of them in `aud`. Empty: `aud` is not checked,
    #: which is only safe when every token of the issuer is meant for this proxy.
    audience: tuple[str, ...] = ()
    #: Also accept a token whose `azp` (the client it was issued to) is in `audience`: Keycloak puts
    #: `account`, not the viewer's client, in `aud` unless an audience mapper adds one.
    audience_matches_azp: bool = False
    #: The signature algorithms accepted: asymmetric only (RS, PS, ES 256/384/512, EdDSA); `none`
    #: and HMAC are refused by the configuration.
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256")
    #: Seconds of clock skew allowed on `exp`, `nbf` and `iat`.
    leeway: int = 30
    #: The claim holding the platform's user ID, which grants name ([users](access.md#users)); a
    #: dotted path reaches a nested claim. A token without it is named by its `sub`.
    user_claim: str = "userId"
    #: The claim holding the roles, as a dotted path (Keycloak's realm roles: `realm_access.roles`).
    roles_claim: str = "realm_access.roles"
    #: Also take the roles in `resource_access.CLIENT.roles` for each client in `audience`.
    client_roles: bool = False
    #: Roles whose holders are not decided on (they may do everything); their requests are still
    #: audited.
    admin_roles: tuple[str, ...] = ("ROLE_ADMIN",)
    #: The URL of the issuer's keys, instead of the `jwks_uri` of its discovery document (for
    #: instance an address inside the network).
    jwks_url: str = ""
    #: A JWKS file of static keys: no network. With private keys in it, `dev-token` signs with them:
    #: for demos and tests.
    jwks_file: str = field(default="", metadata=_PATH)
    #: Seconds between two routine fetches of the issuer's keys.
    jwks_refresh: float = 600.0
    #: At most one extra fetch of the keys per this many seconds for tokens that name an unknown key
    #: (rotation), however many such tokens come.
    jwks_min_refetch: float = 10.0
    #: Accept the token as an `access_token` query parameter (RFC 6750 §2.3) from requests without
    #: an `Authorization` header; see the
    #: [risks](authentication.md#tokens-outside-the-authorization-header).
    allow_query_token: bool = False
    #: Accept the token from the cookie `cookie_name`; see the
    #: [risks](authentication.md#tokens-outside-the-authorization-header).
    allow_cookie_token: bool = False
    #: The cookie read with `allow_cookie_token`.
    cookie_name: str = "access_token"
    #: Opaque (non-JWT) tokens, checked by RFC 7662 introspection. Without this table, a token that
    #: is not a JWT is refused.
    introspection: IntrospectionSettings | None = None

    def _validate(self) -> None:
        # The issuer must equal the token's "iss" claim byte for byte: never normalise it.
        self._check("issuer", lambda v: v and _http_url(v, keep_slash=True))
        self._check("jwks_url", lambda v: v and _http_url(v, keep_slash=True, query=True))
        self._check("audience", functools.partial(_non_empty_items, what="audience"))
        self._check("admin_roles", functools.partial(_non_empty_items, what="role"))
        self._check("algorithms", _algorithms)
        self._require(self.leeway >= 0, "leeway", "must be >= 0")
        self._require(self.jwks_refresh > 0, "jwks_refresh", "must be > 0")
        self._require(self.jwks_min_refetch >= 0, "jwks_min_refetch", "must be >= 0")
        self._require(bool(self.user_claim), "user_claim", "must not be empty")
        self._require(
            bool(self.roles_claim) and "" not in self.roles_claim.split("."),
            "roles_claim",
            f'expected a claim name or dotted path such as "realm_access.roles", '
            f"got {_describe(self.roles_claim)}",
        )
        self._require(
            bool(_TOKEN.fullmatch(self.cookie_name)),
            "cookie_name",
            f"expected a cookie name, got {_describe(self.cookie_name)}",
        )
        if self.enabled and not (
            self.issuer or self.jwks_url or self.jwks_file or self.introspection
        ):
            raise self._error(
                "issuer",
                "required: set issuer, jwks_url, jwks_file or [auth.introspection] "
                "(or write enabled = false to accept requests without a token)",
            )


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class CorsSettings(_Section):
    """``[cors]``: which browser origins may call the proxy."""

    _section = "cors"

    #: The browser origins that may call the proxy (`["https://viewer.example.org"]`), or `["*"]`.
    #: Empty: no CORS headers at all, so a viewer on another origin cannot read the answers.
    allow_origins: tuple[str, ...] = ()
    #: The methods cross-origin requests may use.
    allow_methods: tuple[str, ...] = ("GET", "HEAD", "POST", "OPTIONS")
    #: The request headers cross-origin requests may send.
    allow_headers: tuple[str, ...] = ("Accept", "Authorization", "Content-Type")
    #: The answer headers browser scripts may read (`Warning` says a search has more results).
    expose_headers: tuple[str, ...] = ("Content-Location", "Content-Type", "Warning", "ETag")
    #: Let browsers send cookies cross-origin: needed only with `[auth] allow_cookie_token`; never
    #: with `"*"`.
    allow_credentials: bool = False
    #: Seconds a browser may reuse a preflight answer.
    max_age: int = 600

    def _validate(self) -> None:
        self._check("allow_origins", lambda v: tuple(_origin(o) for o in v))
        if "*" in self.allow_origins:
            self._require(
                len(self.allow_origins) == 1, "allow_origins", '"*" must be the only origin'
            )
            # With credentials, Starlette answers "*" by echoing any Origin: every site could
            # then make credentialed calls.
            self._require(
                not self.allow_credentials,
                "allow_origins",
                '"*" cannot be combined with allow_credentials = true; list the origins',
            )
        for name in ("allow_methods", "allow_headers", "expose_headers"):
            self._check(name, _tokens)
        self._require(self.max_age >= 0, "max_age", "must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class MappingSettings(_Section):
    """``[mapping]``: how examination and acquisition IDs map to study and series UIDs."""

    _section = "mapping"

    #: `"sqlite"`: the embedded store (`[store] path`); `"static"`: `file`; `"http"`: the platform
    #: at `url`; `"shanoir"`: the Shanoir-NG of `[shanoir]` ([Shanoir-NG](shanoir.md));
    #: `"identity"`: every UID is its own public UID ([backends](backends.md)).
    backend: MappingBackend = "sqlite"
    #: Public study UIDs are `study_root.EXAM_ID` (the bare ID when empty): digits and dots, at most
    #: 43 characters, so that root + "." + a 20-digit ID fits in 64.
    study_root: str = ""
    #: Public series UIDs are `series_root.ACQUISITION_ID`; must differ from `study_root` unless
    #: `backend = "identity"`, or `"shanoir"`, whose front end builds series links on the study
    #: root (the position in a path or a dataset tells a study from a series).
    series_root: str = ""
    #: A series the mapping does not know, inside a study it knows (a viewer's new SEG, a series not
    #: synced yet): `"expose"` shows it with its real UID, `"hide"` leaves it out
    #: ([details](identifiers.md#on-the-way-out)).
    unmapped_series: Literal["expose", "hide"] = "expose"
    #: The static file (TOML or JSON; [format](backends.md#the-static-file)); required with, and
    #: only used with, `backend = "static"`.
    file: str = field(default="", metadata=_PATH)
    #: The platform's base URL for the [http contract](backends.md#the-http-contract); required
    #: with, and only used with, `backend = "http"`.
    url: str = ""
    #: A static token sent to the platform as `Authorization: Bearer …`; only with `backend =
    #: "http"`; printable ASCII, no spaces.
    token: str = field(default="", repr=False, metadata=_SECRET)
    #: A file holding the token.
    token_file: str = field(default="", metadata=_secret_file("token"))
    #: Seconds a mapping answer is reused (`0`: not cached); unknown UIDs and IDs are remembered 5 s
    #: at most ([caching](backends.md#caching)).
    cache_ttl: float = 60

    def _validate(self) -> None:
        self._check("study_root", _uid_root)
        self._check("series_root", _uid_root)
        if self.backend not in ("identity", "shanoir") and self.study_root == self.series_root:
            raise self._error(
                "series_root",
                f"must differ from study_root (both are {_describe(self.study_root)}): equal "
                "roots make examination and acquisition IDs collide (unless backend is "
                '"identity" or "shanoir")',
            )
        _check_backend_source(self)
        self._require(self.cache_ttl >= 0, "cache_ttl", "must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class AccessSettings(_Section):
    """``[access]``: who may do what on which examination."""

    _section = "access"

    #: `"sqlite"`: grants in the embedded store (`[store] path`); `"static"`: `file`; `"http"`: the
    #: platform at `url`; `"shanoir"`: the rights of the Shanoir-NG of `[shanoir]`
    #: ([Shanoir-NG](shanoir.md)); `"allow_all"`: every authenticated caller may do everything.
    backend: AccessBackend = "sqlite"
    #: Seconds a decision is reused (`0`: not cached), never past the token's `exp`: a revoke takes
    #: effect within this delay ([caching](access.md#caching-and-revocation-delay)).
    cache_ttl: float = 30
    #: The status of a denial: `404`, like an examination that does not exist, or `403`.
    deny_status: Literal[403, 404] = 404
    #: The action a Part 10 retrieve of a study, series or instance needs
    #: ([actions](access.md#actions)).
    retrieve_action: Literal["read", "download"] = "read"
    #: Up to this many visible examinations a search is narrowed upstream with their study
    #: UIDs (mind the PACS's URL length limit); above, the upstream's pages are filtered
    #: ([details](access.md#what-is-decided-on-every-route)).
    inject_max: int = 200
    #: The static file of grants (TOML or JSON; [format](access.md#the-static-file)); required with,
    #: and only used with, `backend = "static"`.
    file: str = field(default="", metadata=_PATH)
    #: The platform's base URL for the [http contract](access.md#the-http-contract); required with,
    #: and only used with, `backend = "http"`.
    url: str = ""
    #: A static token sent to the platform as `Authorization: Bearer …`, never the user's; only with
    #: `backend = "http"`; printable ASCII, no spaces.
    token: str = field(default="", repr=False, metadata=_SECRET)
    #: A file holding the token.
    token_file: str = field(default="", metadata=_secret_file("token"))

    def _validate(self) -> None:
        self._require(self.cache_ttl >= 0, "cache_ttl", "must be >= 0")
        self._require(self.inject_max >= 0, "inject_max", "must be >= 0")
        _check_backend_source(self)


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class ShanoirServiceSettings(_Section):
    """``[shanoir.service]``: the proxy's own client of the Shanoir-NG realm, for
    ``credentials = "service"``."""

    _section = "shanoir.service"

    #: The realm's token endpoint (Keycloak:
    #: `https://HOST/auth/realms/shanoir-ng/protocol/openid-connect/token`).
    token_url: str = ""
    #: A confidential client with the service-account (client credentials) grant, whose service
    #: account holds `ROLE_ADMIN`: Shanoir answers the rights of every user only to an admin.
    client_id: str = ""
    #: That client's secret (or `client_secret_file`).
    client_secret: str = field(default="", repr=False, metadata=_SECRET)
    #: A file holding the secret (a Kubernetes Secret or systemd credential): read at start, and
    #: again whenever a token is fetched, so that a rotated secret is used.
    client_secret_file: str = field(default="", metadata=_secret_file("client_secret"))
    #: The `scope` asked for with the token; `""` asks for none.
    scope: str = ""

    def _validate(self) -> None:
        if self.token_url:
            self._check("token_url", lambda v: _http_url(v, keep_slash=True, query=True))


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class ShanoirSettings(_Section):
    """``[shanoir]``: the Shanoir-NG whose examinations, acquisitions and rights the
    ``shanoir`` backends of ``[mapping]`` and ``[access]`` use ([Shanoir-NG](shanoir.md))."""

    _section = "shanoir"

    #: Shanoir-NG's base URL, where its `studies` and `datasets` services answer
    #: (`https://shanoir.example.org/shanoir-ng`); required by the `shanoir` backends.
    url: str = ""
    #: `"user"`: each caller's own token is forwarded to Shanoir, which answers with that user's
    #: rights (tokens of the `ohif-viewer` client carry the `userId` Shanoir needs); `"service"`:
    #: the proxy reads the whole rights matrix with its own client (`[shanoir.service]`) once per
    #: `cache_ttl` and decides for each caller's `userId` itself.
    credentials: Literal["user", "service"] = "user"
    #: Seconds Shanoir's answers (rights, examinations, acquisitions) are reused: a right revoked
    #: in Shanoir takes effect within this delay (plus `[access] cache_ttl`).
    cache_ttl: float = 60
    #: Whose name PatientName and PatientID show: `"copies"`: the examination's subject for a
    #: copied examination (as Shanoir does), the PACS's value otherwise; `"always"`: the subject's
    #: name for every examination; `"never"`: the PACS's value.
    patient_name: Literal["copies", "always", "never"] = "copies"
    #: Seconds a request to Shanoir may take before the proxy answers 503.
    timeout: float = 10.0
    #: The proxy's own client, with `credentials = "service"`.
    service: ShanoirServiceSettings = field(default_factory=ShanoirServiceSettings)

    def _validate(self) -> None:
        if self.url:
            self._check("url", _http_url)
        self._require(self.cache_ttl >= 0, "cache_ttl", "must be >= 0")
        self._require(self.timeout > 0, "timeout", "must be > 0")
        service = self.service
        if self.credentials == "service":
            missing = [n for n in ("token_url", "client_id") if not getattr(service, n)]
            if not (service.client_secret or service.client_secret_file):
                missing.append("client_secret")
            if missing:
                raise self._error(
                    "service", f'{", ".join(missing)} required when credentials = "service"'
                )
        elif service.token_url or service.client_id or service.client_secret:
            raise self._error("service", 'only used with credentials = "service"')


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class StoreSettings(_Section):
    """``[store]``: the embedded SQLite store."""

    _section = "store"

    #: The embedded SQLite store, which the `store` commands (`sync`, `list`, `import`, `grant`,
    #: `revoke`) manage and `backend = "sqlite"` in `[mapping]` and `[access]` reads
    #: ([the store](store.md)).
    path: str = field(default="dicomweb-proxy.sqlite3", metadata=_STATE_PATH)

    def _validate(self) -> None:
        self._require(bool(self.path), "path", "must not be empty")


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class LoggingSettings(_Section):
    """``[logging]``: log level and format, and the audit log ("" turns it off)."""

    _section = "logging"

    #: The least severe messages logged.
    level: Literal["debug", "info", "warning", "error"] = "info"
    #: How log lines are written: `"text"` for people, `"json"` (one JSON object per line) for log
    #: collectors.
    format: Literal["text", "json"] = "text"
    #: One line per request (request id, subject, route kind, status, bytes, durations).
    access_log: bool = True
    #: The audit log, one JSON line per decided request ([the audit log](access.md#the-audit-log));
    #: `""` turns it off. A relative path is taken from the state directory
    #: ([files](deployment.md#files-the-proxy-writes)). Created readable by its owner only.
    audit_log: str = field(default="audit.jsonl", metadata=_STATE_PATH)
    #: A group that may read the audit log (a log shipper's, such as `adm`): the file is then
    #: created 0640 and given that group, which the proxy's user must belong to. `""`: 0600.
    audit_log_group: str = ""

    def _validate(self) -> None:
        if self.audit_log_group:
            self._check("audit_log_group", _group)


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class LinksSettings(_Section):
    """``[links]``: signed links, for what a browser cannot send a header with
    ([signed links](links.md))."""

    _section = "links"

    #: Serve `POST {base_path}/links`, which gives an authenticated caller a URL prefix that
    #: reads one examination (or one acquisition) without any header until it expires.
    enabled: bool = False
    #: The longest life of a link, in seconds; a caller may ask for less.
    max_ttl: int = 3600
    #: The keys that sign and verify links: a JSON Web Key Set of `oct` keys of 32 bytes or more,
    #: the newest first. The first signs; all verify; removing a key revokes every link it
    #: signed. Required when `enabled`.
    keys_file: str = field(default="", metadata=_PATH)

    def _validate(self) -> None:
        self._require(0 < self.max_ttl <= 7 * 86400, "max_ttl", "must be from 1 to 604800")
        self._require(
            not self.enabled or bool(self.keys_file), "keys_file", "required when enabled"
        )


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class Settings(_Section):
    """The whole configuration. Load it with :meth:`from_toml` or :meth:`from_dict`."""

    _section = ""

    #: Where the proxy listens, and how it names itself in links.
    server: ServerSettings = field(default_factory=ServerSettings)
    #: The DICOMweb PACS behind the proxy, and the HTTP client that reaches it.
    upstream: UpstreamSettings
    #: How clients' bearer tokens are checked ([authentication](authentication.md)).
    auth: AuthSettings = field(default_factory=AuthSettings)
    #: For browser viewers served from another origin; off unless `allow_origins` is set.
    cors: CorsSettings = field(default_factory=CorsSettings)
    #: How the platform's examination and acquisition IDs map to the PACS's study and series UIDs
    #: ([backends](backends.md), [identifier translation](identifiers.md)).
    mapping: MappingSettings = field(default_factory=MappingSettings)
    #: Who may do what on which examination ([access control](access.md)). Any backend but
    #: `allow_all` needs a `[mapping] backend` other than `identity`.
    access: AccessSettings = field(default_factory=AccessSettings)
    #: The Shanoir-NG the `shanoir` backends read ([Shanoir-NG](shanoir.md)).
    shanoir: ShanoirSettings = field(default_factory=ShanoirSettings)
    #: The embedded SQLite store ([the store](store.md)).
    store: StoreSettings = field(default_factory=StoreSettings)
    #: Signed links for browsers' `<img>`, downloads and shared links ([signed links](links.md)).
    links: LinksSettings = field(default_factory=LinksSettings)
    #: Logs and the audit log ([operations](operations.md)).
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    source: str = field(default="<dict>", compare=False, repr=False, metadata={"file": False})

    def _validate(self) -> None:
        users = [
            f"[{name}] backend"
            for name in ("mapping", "access")
            if getattr(self, name).backend == "shanoir"
        ]
        if users and not self.shanoir.url:
            raise self.shanoir._error("url", f'required when {" and ".join(users)} = "shanoir"')
        if self.links.enabled and self.shanoir.credentials == "user" and users:
            # A link carries no token to forward to Shanoir: its grant is checked locally.
            raise self.links._error(
                "enabled", 'with the shanoir backends, needs credentials = "service"'
            )
        if self.links.enabled and (self.mapping.backend == "identity" or not self.auth.enabled):
            raise self.links._error(
                "enabled",
                "a link grants one examination: it needs [auth] and a [mapping] backend other "
                'than "identity"',
            )

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Settings:
        """Read, coerce and validate one TOML file; relative paths are taken from its folder."""
        source = os.fspath(path)
        try:
            with open(source, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source}: not UTF-8 text: {exc.reason}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: invalid TOML: {exc}") from exc
        return cls.from_dict(data, source=source, base_dir=Path(source).absolute().parent)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, source: str = "<dict>", base_dir: Path | None = None
    ) -> Settings:
        """Coerce and validate parsed TOML; relative paths are taken from ``base_dir``."""
        try:
            return _build(cls, data, "", base_dir, source=source)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


# --- loading ---------------------------------------------------------------------------------


def _build(
    cls: type[_S], data: Mapping[str, Any], section: str, base_dir: Path | None, **extra: Any
) -> _S:
    spec = _fields(cls)
    names = [f.name for f, _ in spec if f.metadata.get("file", True)]
    for key in data:
        if key not in names:
            raise _unknown(cls, section, str(key), data[key], names)
    kwargs: dict[str, Any] = dict(extra)
    for f, hint in spec:
        if not f.metadata.get("file", True):
            continue
        target = f.metadata.get("secret_file")
        if target and data.get(f.name) and data.get(target):
            raise ConfigError(f"{_where(section, f.name)}: give {target} or {f.name}, not both")
        sub = _section_class(hint)
        if f.name in data:
            value = data[f.name]
            if sub is not None:
                if not isinstance(value, Mapping):
                    got = _describe(value)
                    raise ConfigError(f"[{_join(section, f.name)}]: expected a table, got {got}")
                value = _build(sub, value, _join(section, f.name), base_dir)
        elif sub is not None and f.default is dataclasses.MISSING:
            # Build absent sections from nothing, so their relative path defaults get resolved
            # and a missing required section reports its first missing key.
            value = _build(sub, {}, _join(section, f.name), base_dir)
        elif f.metadata.get("path"):
            value = f.default
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_where(section, f.name)}: required")
        else:
            continue
        if f.metadata.get("path") and isinstance(value, str):
            value = _resolve(value, _state_dir(base_dir) if f.metadata.get("state") else base_dir)
        kwargs[f.name] = value
    return typing.cast(_S, typing.cast(Any, cls)(**kwargs))


def _unknown(
    cls: type[_Section], section: str, key: str, value: object, names: list[str]
) -> ConfigError:
    sections = {f.name for f, hint in _fields(cls) if _section_class(hint) is not None}
    is_table = isinstance(value, Mapping) or (not section and key not in _all_keys())
    candidates = [n for n in names if (n in sections) == is_table] or names
    close = difflib.get_close_matches(key, candidates, n=1)
    if close:
        match = close[0]
        hint = f"[{_join(section, match)}]" if match in sections else match
        suggestion = f" (did you mean '{hint}'?)"
    else:
        owners = _all_keys().get(key, [])
        suggestion = f" (it belongs in [{owners[0]}])" if len(owners) == 1 else ""
    if is_table:
        return ConfigError(f"[{_join(section, key)}]: unknown section{suggestion}")
    return ConfigError(f"{_where(section, key)}: unknown key{suggestion}")


@functools.cache
def _all_keys() -> dict[str, list[str]]:
    """Every scalar key name, with the sections that hold it."""
    owners: dict[str, list[str]] = {}

    def walk(cls: type[_Section], section: str) -> None:
        for f, hint in _fields(cls):
            sub = _section_class(hint)
            if sub is not None:
                walk(sub, _join(section, f.name))
            elif section:
                owners.setdefault(f.name, []).append(section)

    walk(Settings, "")
    return owners


def _state_dir(base_dir: Path | None) -> Path | None:
    """Where relative paths of the files the proxy writes go: ``$STATE_DIRECTORY`` (its first
    entry) when set, else ``base_dir``; never anywhere when nothing is resolved."""
    state = os.environ.get(_STATE_DIRECTORY_ENV, "").split(":")[0]
    if base_dir is None or not state:
        return base_dir
    return base_dir / state  # an absolute $STATE_DIRECTORY replaces base_dir


def _resolve(value: str, base_dir: Path | None) -> str:
    if not value or base_dir is None or Path(value).is_absolute():
        return value
    return str(base_dir / value)


def _join(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _where(section: str, key: str) -> str:
    return f"[{section}] {key}" if section else key


# --- coercion --------------------------------------------------------------------------------


_FieldSpec = tuple[tuple[dataclasses.Field[Any], Any], ...]
_SPECS: dict[type[Any], _FieldSpec] = {}


def _fields(cls: type[Any]) -> _FieldSpec:
    """The dataclass fields of ``cls`` with their resolved type hints (memoised)."""
    spec = _SPECS.get(cls)
    if spec is None:
        hints = typing.get_type_hints(cls)
        spec = _SPECS[cls] = tuple((f, hints[f.name]) for f in dataclasses.fields(cls))
    return spec


def _section_class(hint: Any) -> type[_Section] | None:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if isinstance(hint, type) and issubclass(hint, _Section):
        return hint
    return None


def _coerce(hint: Any, value: object) -> object:
    """Return ``value`` as the type ``hint`` names, or raise _Mismatch."""
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch("a string")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch("an integer")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise _Mismatch("a finite number")
            return float(value)
        raise _Mismatch("a number")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        for allowed in args:
            if type(value) is type(allowed) and value == allowed:
                return allowed
        raise _Mismatch("one of " + ", ".join(_describe(a) for a in args))
    if origin is tuple and args == (str, Ellipsis):
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise _Mismatch("a string or an array of strings")
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _coerce(inner, value)
    if isinstance(hint, type) and issubclass(hint, _Section):
        if isinstance(value, hint):
            return value
        raise _Mismatch(hint.__name__)
    raise TypeError(f"unsupported settings field type: {hint!r}")


def _describe(value: object, *, secret: bool = False) -> str:
    """Show a value as TOML would write it, on one short line; a secret only by its kind."""
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, datetime.date | datetime.time):
        return "a date/time"
    if secret:
        kinds = [(bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string")]
        kind = next((k for t, k in kinds if isinstance(value, t)), None)
        return kind or ("an array" if isinstance(value, list | tuple) else "a value")
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, list | tuple):
        text = "[" + ", ".join(_describe(v) for v in value) + "]"
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:79] + "…"


# --- value checks: return the normalised value or raise ValueError ---------------------------


def _split_bind(bind: str) -> tuple[str, int]:
    expected = f"expected HOST:PORT (IPv6 as [::1]:8080), got {_describe(bind)}"
    host, sep, port = bind.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or int(port) > 65535:
        raise ValueError(expected)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(expected) from None
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(expected)
    return host, int(port)


def _bind(value: str) -> str:
    _split_bind(value)
    return value


def _peers(value: tuple[str, ...]) -> tuple[str, ...]:
    if "*" in value and len(value) > 1:
        raise ValueError('"*" must be the only entry')
    for item in value:
        if item == "*":
            continue
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(
                'expected IP addresses or networks such as "10.0.0.0/8", or "*", '
                f"got {_describe(item)}"
            ) from None
    return value


def _group(value: str) -> str:
    try:
        if value.isdigit():
            grp.getgrgid(int(value))
        else:
            grp.getgrnam(value)
    except (KeyError, OverflowError):
        raise ValueError(f"no such group: {_describe(value)}") from None
    return value


def _base_path(value: str) -> str:
    path = value.rstrip("/")
    segments = path.split("/")
    if (value and not value.startswith("/")) or any(
        not _PATH_SEGMENT.fullmatch(s) or s in (".", "..") for s in segments[1:]
    ):
        raise ValueError(
            'expected a path such as "/dicomweb" (segments of letters, digits and "-._~", '
            f'no "." or ".."), got {_describe(value)}'
        )
    return path


def _probe_path(value: str) -> str:
    if value == "":
        return value
    path = _base_path(value)
    if not path:
        raise ValueError(
            f'expected a path such as "/healthz", or "" for off, got {_describe(value)}'
        )
    return path


def _http_url(value: str, *, keep_slash: bool = False, query: bool = False, hint: str = "") -> str:
    expected = f"expected an absolute http or https URL, got {_describe(value)}"
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(expected)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(expected) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(expected)
    if "@" in parts.netloc:
        raise ValueError(f"must not hold credentials (user:password@){hint}")
    if "#" in value:
        raise ValueError(f"must not have a fragment, got {_describe(value)}")
    if not query and "?" in value:
        raise ValueError(f"must not have a query, got {_describe(value)}")
    return value if keep_slash else value.rstrip("/")


def _uid_root(value: str) -> str:
    if value and not _UID_ROOT.fullmatch(value):
        raise ValueError(
            "expected a UID root: digits and dots, no empty components, no leading zeros, "
            f"got {_describe(value)}"
        )
    if len(value) > _MAX_ROOT_LENGTH:
        raise ValueError(
            f"too long ({len(value)} characters): at most {_MAX_ROOT_LENGTH}, so that "
            'root + "." + a 20-digit ID stays within the 64 characters of a UID'
        )
    return value


def _algorithms(value: tuple[str, ...]) -> tuple[str, ...]:
    allowed = ", ".join(_ASYMMETRIC_ALGORITHMS)
    if not value:
        raise ValueError(f"expected at least one of {allowed}")
    for name in value:
        if name not in _ASYMMETRIC_ALGORITHMS:
            why = (
                ": shared-secret and unsigned tokens are refused"
                if name.lower() == "none" or name.upper().startswith("HS")
                else ""
            )
            raise ValueError(f"{_describe(name)} is not allowed{why}; use {allowed}")
    return value


def _non_empty_items(value: tuple[str, ...], *, what: str) -> tuple[str, ...]:
    if "" in value:
        raise ValueError(f"expected non-empty {what} names, got {_describe(value)}")
    return value


def _tokens(value: tuple[str, ...]) -> tuple[str, ...]:
    for item in value:
        if not _TOKEN.fullmatch(item):
            raise ValueError(f"expected header or method names, got {_describe(item)}")
    return value


def _origin(value: str) -> str:
    """A browser origin, normalised as browsers send it: lower case, no default port."""
    if value == "*":
        return value
    expected = (
        'expected "*" or an origin such as "https://viewer.example.org" '
        f"(scheme://host[:port], no path), got {_describe(value)}"
    )
    text = value.removesuffix("/")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(expected) from None
    scheme = parts.scheme.lower()
    if (
        scheme not in ("http", "https")
        or not parts.hostname
        or "@" in parts.netloc
        or any(c in text for c in "?# ")
        or parts.path
    ):
        raise ValueError(expected)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is None or port == {"http": 80, "https": 443}[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def _check_backend_source(settings: MappingSettings | AccessSettings) -> None:
    """``file`` is for (and required by) the static backend, ``url`` (and ``token``) for the
    http one."""
    for name, backend in (("file", "static"), ("url", "http")):
        value = getattr(settings, name)
        if settings.backend == backend and not value:
            raise settings._error(name, f'required when backend = "{backend}"')
        if settings.backend != backend and value:
            raise settings._error(
                name, f'only used with backend = "{backend}" (backend is "{settings.backend}")'
            )
    if settings.url:
        settings._check("url", _http_url)
    if settings.token and settings.backend != "http":
        raise settings._error(
            "token", f'only used with backend = "http" (backend is "{settings.backend}")'
        )
    settings._require(
        not settings.token or bool(_BEARER.fullmatch(settings.token)),
        "token",
        "expected a token of printable ASCII characters without spaces",
    )
