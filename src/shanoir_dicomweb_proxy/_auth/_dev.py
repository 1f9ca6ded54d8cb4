"""Tokens signed with a local key, for demos and tests (``dev-token``)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from joserfc import jwt

from .._config import Settings
from .._errors import ConfigError
from ._keys import read_jwks

__all__ = ["dev_token"]

_SIGNING = {"RSA": "RS256", "EC": "ES256", "OKP": "EdDSA"}


def dev_token(settings: Settings, subject: str, claims: Mapping[str, Any], *, ttl: int) -> str:
    """A token signed with the private key in ``[auth] jwks_file``, shaped like Keycloak's.

    For demos and tests of deployments that trust that file; refuses to run without a private
    key in it.
    """
    auth = settings.auth
    if not auth.jwks_file:
        raise ConfigError(f"{settings.source}: [auth] jwks_file: required by dev-token")
    keys = read_jwks(auth.jwks_file)
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
