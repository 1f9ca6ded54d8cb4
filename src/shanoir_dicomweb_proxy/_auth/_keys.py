"""The issuer's signing keys: discovered, fetched, refreshed, or read from a file."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from .._errors import AuthUnavailable, ConfigError

__all__ = ["KeyStore", "read_jwks"]

logger = logging.getLogger("shanoir_dicomweb_proxy.auth")

_UNREACHABLE = "the identity provider cannot be reached to check tokens"


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
            self._set(_public_keys(read_jwks(jwks_file).as_dict(private=False)))

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


def read_jwks(path: str) -> KeySet:
    """The key set of a JWKS file (``[auth] jwks_file``), private parts included."""
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
