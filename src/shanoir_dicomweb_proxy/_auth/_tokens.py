"""Bearer tokens to principals: JWTs (Keycloak's access tokens) checked locally against the
issuer's keys, opaque tokens by introspection (RFC 7662). JOSE errors and identity provider
failures are translated here into :class:`InvalidToken` (401) and :class:`AuthUnavailable`
(503)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Any

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

from .._config import AuthSettings
from .._errors import AuthUnavailable, InvalidToken
from .._scope import Principal
from ._keys import KeyStore

__all__ = ["TokenValidator", "principal_from_claims"]

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
    settings: AuthSettings, claims: Mapping[str, Any], token_id: str, *, token: str = ""
) -> Principal:
    """Build the principal a token's claims describe (``token``: the token itself)."""
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
        token=token,
    )


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
        if principal is not None and principal.token == token:
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
        principal = principal_from_claims(self.settings, claims, token_id, token=token)
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
            raise AuthUnavailable(_UNREACHABLE) from None
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
