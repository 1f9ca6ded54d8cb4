"""Authentication: OIDC bearer tokens to a :class:`Principal` in the scope.

JWTs (Keycloak's access tokens) are checked locally against the issuer's keys; opaque tokens are
checked by introspection (RFC 7662). JOSE errors and IdP failures are translated here into
:class:`InvalidToken` (401) and :class:`AuthUnavailable` (503).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
from cachetools import TLRUCache
from joserfc import jws, jwt
from joserfc.errors import (
    BadSignatureError,
    ClaimError,
    ExpiredTokenError,
    InvalidKeyIdError,
    JoseError,
)
from joserfc.jwk import KeySet

from ._config import AuthSettings, Settings
from ._errors import AuthUnavailable, ConfigError, InvalidToken, ProxyError
from ._headers import header
from ._scope import Principal, get_record, set_principal
from ._types import ASGIApp, Receive, Scope, Send

__all__ = [
    "AuthMiddleware",
    "KeyStore",
    "TokenValidator",
    "dev_token",
]

logger = logging.getLogger("shanoir_dicomweb_proxy.auth")

_ACCEPTED_TYPES = frozenset({"jwt", "at+jwt", "application/at+jwt"})
_UNREACHABLE = "the identity provider cannot be reached to check tokens"


def _dotted(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def principal_from_claims(
    settings: AuthSettings, claims: Mapping[str, Any], token_id: str
) -> Principal:
    """Build the principal a token's claims describe."""
    roles = set(_strings(_dotted(claims, settings.roles_claim)))
    if settings.client_roles:
        access = claims.get("resource_access")
        if isinstance(access, Mapping):
            for client in settings.audience:
                roles.update(_strings(_dotted(access, f"{client}.roles")))
    user_id = _dotted(claims, settings.user_claim)
    username = claims.get("preferred_username")
    exp = claims.get("exp")
    return Principal(
        subject=str(claims["sub"]),
        user_id=None if user_id is None or isinstance(user_id, Mapping | list) else str(user_id),
        username=username if isinstance(username, str) else None,
        roles=frozenset(roles),
        claims=claims,
        expires_at=float(exp) if isinstance(exp, int | float) else None,
        is_admin=bool(roles.intersection(settings.admin_roles)),
        token_id=token_id,
    )


class KeyStore:
    """The issuer's signing keys: fetched (discovery, then JWKS) or read from a file, cached.

    An unknown ``kid`` triggers one refetch, at most every ``min_refetch`` seconds whatever
    the number of forged kids; keys are refreshed every ``refresh`` seconds otherwise. When the
    issuer cannot be reached, the keys already known keep serving.
    """

    def __init__(
        self,
        *,
        issuer: str = "",
        jwks_url: str = "",
        jwks_file: str = "",
        client: httpx.AsyncClient | None = None,
        refresh: float = 600.0,
        min_refetch: float = 30.0,
    ) -> None:
        self.issuer = issuer
        self.jwks_url = jwks_url
        self.jwks_file = jwks_file
        self._client = client
        self._refresh = refresh
        self._min_refetch = min_refetch
        self._keys: KeySet | None = None
        self._kids: frozenset[str | None] = frozenset()
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._lock = asyncio.Lock()
        #: Why the last fetch failed ("" when it succeeded, or before any).
        self.last_error = ""
        if jwks_file:
            self._set(_public_keys(_read_jwks(jwks_file).as_dict(private=False)))

    @property
    def known(self) -> int:
        """How many keys are known now."""
        return 0 if self._keys is None else len(self._keys.keys)

    @property
    def age(self) -> float:
        """Seconds since the keys were fetched (or read from the file); infinite before."""
        return time.monotonic() - self._fetched_at

    @property
    def stale(self) -> bool:
        """Whether the keys are due for a refresh (or were never fetched)."""
        return self.age > self._refresh

    async def refresh(self) -> None:
        """Fetch the keys now, unless a fetch was tried in the last ``min_refetch`` seconds.

        Never raises: a failure keeps the keys already known and sets :attr:`last_error`.
        """
        if not self.jwks_file and time.monotonic() - self._attempted_at >= self._min_refetch:
            await self._fetch()

    def _set(self, keys: KeySet) -> None:
        self._keys = keys
        self._kids = frozenset(key.kid for key in keys.keys)
        self._fetched_at = time.monotonic()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(trust_env=False, timeout=5.0)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def keys(self, kid: str | None) -> KeySet:
        """The key set to verify a token with this ``kid``."""
        if self.jwks_file:
            assert self._keys is not None
            return self._keys
        now = time.monotonic()
        stale = now - self._fetched_at > self._refresh
        unknown = kid not in self._kids
        if (stale or unknown) and now - self._attempted_at >= self._min_refetch:
            await self._fetch()
        if self._keys is None:
            raise AuthUnavailable(_UNREACHABLE)
        return self._keys

    async def _fetch(self) -> None:
        async with self._lock:
            if time.monotonic() - self._attempted_at < self._min_refetch:
                return  # another request fetched while this one waited
            self._attempted_at = time.monotonic()
            try:
                url = self.jwks_url or await self._jwks_uri()
                response = await self.client.get(url)
                response.raise_for_status()
                self._set(_public_keys(response.json()))
            except (httpx.HTTPError, ValueError, JoseError) as exc:
                self.last_error = _fetch_error(exc)
                logger.warning("could not fetch the issuer's keys: %s", exc)
            else:
                self.last_error = ""

    async def _jwks_uri(self) -> str:
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        response = await self.client.get(url)
        response.raise_for_status()
        uri = response.json().get("jwks_uri")
        if not isinstance(uri, str):
            raise ValueError("the discovery document has no jwks_uri")
        return uri


def _fetch_error(exc: Exception) -> str:
    """Why fetching the keys failed, in a few words, naming the URL that failed."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"{exc.request.url} answered {exc.response.status_code}"
    if isinstance(exc, httpx.HTTPError):
        try:
            url = f"{exc.request.url}: "
        except RuntimeError:  # an error raised before any request was built
            url = ""
        if isinstance(exc, httpx.TimeoutException):
            return f"{url}no answer in time"
        return f"{url}cannot be reached"
    if isinstance(exc, json.JSONDecodeError):
        return "the identity provider answered what is not JSON"
    if isinstance(exc, JoseError):
        return f"the JWKS holds no usable key ({exc})"
    return str(exc)


def _read_jwks(path: str) -> KeySet:
    try:
        return KeySet.import_key_set(json.loads(Path(path).read_text()))
    except (OSError, ValueError, JoseError) as exc:
        raise ConfigError(f"[auth] jwks_file: {path}: not a readable JWKS ({exc})") from None


def _public_keys(data: Mapping[str, Any]) -> KeySet:
    """Only the public half of each key, and only asymmetric keys."""
    keys = [k for k in data.get("keys", []) if isinstance(k, dict) and k.get("kty") != "oct"]
    public = {"keys": [{n: v for n, v in k.items() if n not in _PRIVATE_PARTS} for k in keys]}
    return KeySet.import_key_set(public)  # type: ignore[arg-type]


_PRIVATE_PARTS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class TokenValidator:
    """Check a bearer token and return its principal; answers are cached until ``exp``."""

    def __init__(
        self,
        settings: AuthSettings,
        *,
        keys: KeyStore | None = None,
        client: httpx.AsyncClient | None = None,
        realm: str = "dicomweb",
        cache_size: int = 10000,
    ) -> None:
        self.settings = settings
        self.realm = realm
        self.keys = keys or KeyStore(
            issuer=settings.issuer,
            jwks_url=settings.jwks_url,
            jwks_file=settings.jwks_file,
            client=client,
            refresh=settings.jwks_refresh,
            min_refetch=settings.jwks_min_refetch,
        )
        self._client = client
        self._cache: TLRUCache[str, Principal] = TLRUCache(
            maxsize=cache_size, ttu=_until_expiry, timer=time.time
        )
        self._inactive: TLRUCache[str, bool] = TLRUCache(
            maxsize=cache_size, ttu=lambda k, v, now: now + 10.0, timer=time.time
        )
        #: Validations answered from the cache, and those that were not (metrics).
        self.cache_hits = 0
        self.cache_misses = 0

    async def aclose(self) -> None:
        await self.keys.aclose()

    def _invalid(self, reason: str, detail: str = "the access token is not valid") -> InvalidToken:
        return InvalidToken(detail, realm=self.realm, reason=reason)

    async def validate(self, token: str) -> Principal:
        token_id = hashlib.sha256(token.encode()).hexdigest()[:16]
        principal = self._cache.get(token_id)
        if principal is not None:
            self.cache_hits += 1
            return principal
        self.cache_misses += 1
        if token.count(".") == 2:
            claims = await self._check_jwt(token, token_id)
        elif self.settings.introspection is not None:
            claims = await self._introspect(token, token_id)
        else:
            logger.info("token %s refused: not a JWT", token_id)
            raise self._invalid("malformed")
        principal = principal_from_claims(self.settings, claims, token_id)
        self._cache[token_id] = principal
        return principal

    async def _check_jwt(self, token: str, token_id: str) -> dict[str, Any]:
        s = self.settings
        try:
            header_ = jws.extract_compact(token.encode()).headers()
        except (JoseError, ValueError) as exc:
            logger.info("token %s refused: malformed (%s)", token_id, exc)
            raise self._invalid("malformed") from None
        alg = header_.get("alg")
        if alg not in s.algorithms:
            # "none" and every HMAC algorithm are never in the list (the config refuses them).
            logger.info("token %s refused: algorithm %r", token_id, alg)
            raise self._invalid("algorithm")
        typ = header_.get("typ")
        if not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYPES:
            logger.info("token %s refused: typ %r", token_id, typ)
            raise self._invalid("token_type")
        kid = header_.get("kid")
        keys = await self.keys.keys(kid if isinstance(kid, str) else None)
        if kid is None and len(keys.keys) > 1:
            logger.info("token %s refused: no kid, and the issuer has several keys", token_id)
            raise self._invalid("unknown_key")
        try:
            decoded = jwt.decode(token, keys, algorithms=list(s.algorithms))
            self._registry().validate(decoded.claims)
        except ExpiredTokenError:
            raise self._invalid("expired", "the access token expired") from None
        except (JoseError, ValueError) as exc:
            logger.info("token %s refused: %s", token_id, exc)
            raise self._invalid(_jose_reason(exc)) from None
        kind = decoded.claims.get("typ", "Bearer")
        if not isinstance(kind, str) or kind.lower() != "bearer":
            # Keycloak marks its ID and refresh tokens in the payload ("typ": "ID", "Refresh")
            # and signs them with the same key, under the same header type as access tokens.
            logger.info("token %s refused: token type %r", token_id, kind)
            raise self._invalid("token_type")
        self._check_audience(decoded.claims, token_id)
        return decoded.claims

    def _registry(self) -> jwt.JWTClaimsRegistry:
        s = self.settings
        options: dict[str, Any] = {"exp": {"essential": True}, "sub": {"essential": True}}
        if s.issuer:
            options["iss"] = {"essential": True, "value": s.issuer}
        return jwt.JWTClaimsRegistry(leeway=s.leeway, **options)

    def _check_audience(self, claims: Mapping[str, Any], token_id: str) -> None:
        wanted = set(self.settings.audience)
        if not wanted:
            return
        got = set(_strings(claims.get("aud")))
        if self.settings.audience_matches_azp:
            got.update(_strings(claims.get("azp")))
        if not got & wanted:
            logger.info("token %s refused: audience %s", token_id, sorted(got))
            raise self._invalid("wrong_audience")

    async def _introspect(self, token: str, token_id: str) -> dict[str, Any]:
        settings = self.settings.introspection
        assert settings is not None
        if self._inactive.get(token_id):
            raise self._invalid("inactive")
        client = self.keys.client
        try:
            response = await client.post(
                settings.url,
                data={"token": token, "token_type_hint": "access_token"},
                auth=(settings.client_id, settings.client_secret),
                headers={"accept": "application/json"},
            )
            response.raise_for_status()
            claims = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            logger.warning("token introspection failed: %s", exc)
            raise AuthUnavailable(
                "the identity provider cannot be reached to check tokens"
            ) from None
        if not isinstance(claims, dict) or claims.get("active") is not True or "sub" not in claims:
            self._inactive[token_id] = True
            logger.info("token %s refused: inactive", token_id)
            raise self._invalid("inactive")
        now = time.time()
        exp = claims.get("exp")
        if isinstance(exp, int | float) and exp + self.settings.leeway < now:
            raise self._invalid("expired", "the access token expired")
        if self.settings.issuer and claims.get("iss", self.settings.issuer) != self.settings.issuer:
            raise self._invalid("wrong_issuer")
        self._check_audience(claims, token_id)
        # Cached for at most [auth.introspection] cache_ttl, and never past the token's expiry.
        limit = now + settings.cache_ttl
        claims["exp"] = min(exp, limit) if isinstance(exp, int | float) else limit
        return claims


def _jose_reason(exc: Exception) -> str:
    """The reason word of a token joserfc refused."""
    if isinstance(exc, BadSignatureError):
        return "bad_signature"
    if isinstance(exc, InvalidKeyIdError):
        return "unknown_key"
    if isinstance(exc, ClaimError):
        return "wrong_issuer" if exc.claim == "iss" else "invalid_claims"
    return "malformed"


def _until_expiry(key: str, principal: Principal, now: float) -> float:
    return principal.expires_at if principal.expires_at is not None else now


class AuthMiddleware:
    """Require a valid bearer token; put its :class:`Principal` in the scope.

    The token is read from ``Authorization: Bearer``, or, when allowed, from the
    ``access_token`` query parameter (RFC 6750 §2.3) or a cookie. An ``access_token`` query
    parameter is removed before the request goes on, allowed or not. Non-HTTP scopes pass
    straight through.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        validator: TokenValidator,
        allow_query_token: bool = False,
        allow_cookie_token: bool = False,
        cookie_name: str = "access_token",
    ) -> None:
        self.app = app
        self.validator = validator
        self.allow_query_token = allow_query_token
        self.allow_cookie_token = allow_cookie_token
        self.cookie_name = cookie_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = get_record(scope)
        try:
            token = self._token(scope)
            if token is None:
                raise InvalidToken(
                    "an access token is required", realm=self.validator.realm, error=None
                )
            principal = await self.validator.validate(token)
        except ProxyError as exc:
            if record is not None:
                record.token_failure = (
                    exc.reason if isinstance(exc, InvalidToken) else "unavailable"
                )
            raise
        if record is not None:
            record.subject, record.user_id = principal.subject, principal.user_id
        set_principal(scope, principal)
        await self.app(scope, receive, send)

    def _token(self, scope: Scope) -> str | None:
        # A token in the query never goes further, whether it is the one used or not.
        query_token = _pop_query_token(scope)
        value = header(scope, b"authorization")
        if value is not None:
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not credentials.strip():
                raise InvalidToken(
                    "the Authorization header is not a bearer token",
                    realm=self.validator.realm,
                    error="invalid_request",
                    reason="malformed",
                )
            return credentials.strip()
        if self.allow_query_token and query_token:
            return query_token
        if self.allow_cookie_token:
            return _cookie(scope, self.cookie_name)
        return None


def _pop_query_token(scope: Scope) -> str | None:
    raw: bytes = scope.get("query_string", b"")
    if b"access_token=" not in raw:
        return None
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    token: str | None = next((v for k, v in pairs if k == "access_token"), None)
    # The token must not travel further: not upstream, not into logs of the layers below.
    scope["query_string"] = urlencode([(k, v) for k, v in pairs if k != "access_token"]).encode()
    return token


def _cookie(scope: Scope, name: str) -> str | None:
    value = header(scope, b"cookie")
    if value is not None:
        for item in value.decode("latin-1").split(";"):
            cookie_name, _, cookie_value = item.strip().partition("=")
            if cookie_name == name and cookie_value:
                return cookie_value
    return None


_SIGNING = {"RSA": "RS256", "EC": "ES256", "OKP": "EdDSA"}


def dev_token(settings: Settings, subject: str, claims: Mapping[str, Any], *, ttl: int) -> str:
    """A token signed with the private key in ``[auth] jwks_file``, shaped like Keycloak's.

    For demos and tests of deployments that trust that file; refuses to run without a private
    key in it.
    """
    auth = settings.auth
    if not auth.jwks_file:
        raise ConfigError(f"{settings.source}: [auth] jwks_file: required by dev-token")
    keys = _read_jwks(auth.jwks_file)
    private = [k for k in keys.keys if k.is_private and k.key_type in _SIGNING]
    if not private:
        raise ConfigError(f"{auth.jwks_file}: holds no private key to sign with")
    key = private[0]
    alg = _SIGNING[key.key_type]
    if alg not in auth.algorithms:
        raise ConfigError(f"{settings.source}: [auth] algorithms: does not allow {alg}")
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": auth.issuer or "shanoir-dicomweb-proxy dev-token",
        "sub": subject,
        "preferred_username": subject,
        "iat": now,
        "exp": now + ttl,
        "typ": "Bearer",
    }
    if auth.audience:
        payload["aud"] = list(auth.audience)
        payload["azp"] = auth.audience[0]
    payload.update(claims)
    header_ = {"alg": alg, "typ": "JWT", "kid": key.kid}
    return jwt.encode(header_, payload, key, algorithms=[alg])
