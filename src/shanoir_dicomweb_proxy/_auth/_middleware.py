"""The auth layer (DESIGN §2): a valid bearer token, or 401 with an RFC 6750 challenge."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

from .._errors import InvalidToken, ProxyError
from .._headers import header
from .._scope import get_principal, get_record, set_principal
from .._types import ASGIApp, Receive, Scope, Send
from ._tokens import TokenValidator

__all__ = ["AuthMiddleware"]


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
        existing = get_principal(scope)
        if scope["type"] != "http" or (existing is not None and existing.link is not None):
            # A signed link (checked further out) stands in for a token: nothing more to read.
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
