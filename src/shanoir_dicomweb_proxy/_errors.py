"""The proxy's one error hierarchy.

Every error a request can meet is a :class:`ProxyError` carrying an HTTP ``status``, a short
machine ``code`` and a human ``detail``. Lower layers (httpx, the config loader, backends)
raise their own exceptions; they are translated into this hierarchy at one boundary each
(``raise ... from exc``), and turned into a JSON problem response only at the outer edge
(:class:`shanoir_dicomweb_proxy.ErrorMiddleware`).

``detail`` is shown to the client: it must never carry anything the client did not send
(no upstream UID, no token, no stack trace).
"""

from __future__ import annotations

__all__ = [
    "AccessUnavailable",
    "AuthUnavailable",
    "BadRequest",
    "ConfigError",
    "Forbidden",
    "InvalidToken",
    "MalformedBody",
    "MappingUnavailable",
    "MethodNotAllowed",
    "NotAcceptable",
    "NotFound",
    "PayloadTooLarge",
    "ProxyError",
    "ShanoirUnavailable",
    "SpoolUnavailable",
    "UnsupportedMediaType",
    "UpstreamError",
    "UpstreamRejected",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class ProxyError(Exception):
    """Base of every error answered to a client."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class BadRequest(ProxyError):
    status = 400
    code = "bad_request"


class InvalidToken(ProxyError):
    """401 with an RFC 6750 challenge. ``error`` is absent when no token was sent at all.

    ``reason`` says why in a fixed word for metrics and logs (``missing``, ``malformed``,
    ``expired``, ``bad_signature``, ``wrong_audience``, ...); never the token.
    """

    status = 401
    code = "invalid_token"

    def __init__(
        self,
        detail: str,
        *,
        realm: str,
        error: str | None = "invalid_token",
        reason: str = "invalid",
    ) -> None:
        challenge = f'Bearer realm="{realm}"'
        if error is not None:
            challenge += f', error="{error}", error_description="{detail}"'
        super().__init__(detail, headers={"www-authenticate": challenge})
        self.reason = reason
        if error is None:
            self.code = "missing_token"
            self.reason = "missing"


class Forbidden(ProxyError):
    """A denial answered 403 (``[access] deny_status = 403``), worded like a missing study."""

    status = 403
    code = "forbidden"


class NotFound(ProxyError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, detail: str, *, allow: tuple[str, ...]) -> None:
        super().__init__(detail, headers={"allow": ", ".join(allow)})
        self.allow = allow


class NotAcceptable(ProxyError):
    status = 406
    code = "not_acceptable"


class PayloadTooLarge(ProxyError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ProxyError):
    status = 415
    code = "unsupported_media_type"


class UpstreamRejected(ProxyError):
    """The upstream refused the request (4xx): its status is passed on."""

    code = "upstream_rejected"

    def __init__(self, detail: str, *, status: int) -> None:
        super().__init__(detail)
        self.status = status


class UpstreamError(ProxyError):
    """The upstream failed (5xx, broken framing): 502."""

    status = 502
    code = "upstream_error"


class MalformedBody(UpstreamError):
    """A body that cannot be parsed; ``what`` says what it is ("a truncated DICOM file").

    Bodies come from the upstream unless a caller parsing a client's upload says otherwise
    (:meth:`from_client`)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"the upstream sent {what}")
        self.what = what

    def from_client(self) -> BadRequest:
        return BadRequest(f"the request body holds {self.what}")


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached: 502."""

    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time: 504."""

    status = 504
    code = "upstream_timeout"


class AuthUnavailable(ProxyError):
    """Tokens cannot be checked now (the identity provider cannot be reached): 503."""

    status = 503
    code = "auth_unavailable"


class MappingUnavailable(ProxyError):
    """The identifier mapping cannot answer now (its platform is unreachable, slow, failing or
    answered nonsense): 503, and nothing is served rather than served unmapped.
    """

    status = 503
    code = "mapping_unavailable"


class AccessUnavailable(ProxyError):
    """Access decisions cannot be made now (the policy's platform or store cannot answer): 503,
    and nothing is served rather than served unchecked.
    """

    status = 503
    code = "access_unavailable"


class ShanoirUnavailable(ProxyError):
    """Shanoir-NG cannot answer now (unreachable, slow, failing, refusing the token used, or
    answering what its API does not allow): 503; nothing is served rather than served unchecked
    or unmapped."""

    status = 503
    code = "shanoir_unavailable"


class SpoolUnavailable(ProxyError):
    """An upload cannot be held whole before it goes to the PACS (the disk of the temporary
    files is full, or failing): 503, and nothing is sent to the PACS."""

    status = 503
    code = "spool_unavailable"


class ConfigError(Exception):
    """A configuration file or value is invalid; the message names file, key and expectation."""
