"""The proxy's own OAuth 2.0 tokens (client credentials), for the PACS and for the platform."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable

import httpx

from ._errors import ProxyError

__all__ = ["ClientCredentials"]

logger = logging.getLogger("shanoir_dicomweb_proxy.oauth")

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})


class ClientCredentials(httpx.Auth):
    """The proxy's own token (OAuth 2.0 client credentials, RFC 6749 §4.4), as httpx auth.

    Fetched on first use, shared by all requests, renewed 30 s before it expires, and once more
    when the server answers 401 to an idempotent request. The client authenticates with HTTP
    Basic; ``client_secret`` may be a callable (a secret read from a file when a token is
    fetched). A token that cannot be obtained raises ``unavailable()``. A plain form POST:
    authlib's httpx integration is deprecated in the versions this project runs with.
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str | Callable[[], str],
        *,
        scope: str = "",
        timeout: float,
        unavailable: Callable[[], ProxyError],
    ) -> None:
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._scope = scope
        self._unavailable = unavailable
        self._timeout = timeout
        self._token = ""
        self._renew_at = 0.0
        self._lock = asyncio.Lock()

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        request.headers["Authorization"] = f"Bearer {await self._get(stale=None)}"
        response = yield request
        if response.status_code == 401 and request.method in _IDEMPOTENT:
            token = await self._get(stale=request.headers["Authorization"][7:])
            request.headers["Authorization"] = f"Bearer {token}"
            yield request

    async def _get(self, *, stale: str | None) -> str:
        async with self._lock:
            if self._token and self._token != stale and time.monotonic() < self._renew_at:
                return self._token
            data = {"grant_type": "client_credentials"}
            if self._scope:
                data["scope"] = self._scope
            secret = self._client_secret
            try:
                if callable(secret):
                    secret = secret()
                async with httpx.AsyncClient(trust_env=False, timeout=self._timeout) as client:
                    response = await client.post(
                        self._token_url, data=data, auth=(self._client_id, secret)
                    )
                response.raise_for_status()
                body = response.json()
                token, expires_in = body["access_token"], float(body.get("expires_in", 60))
            except (httpx.HTTPError, OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("could not obtain a token from %s: %s", self._token_url, exc)
                raise self._unavailable() from None
            self._token = str(token)
            self._renew_at = time.monotonic() + max(expires_in - 30.0, expires_in / 2)
            return self._token
