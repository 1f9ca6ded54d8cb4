"""The auth layer (DESIGN §2): OIDC bearer tokens to a
:class:`~shanoir_dicomweb_proxy.Principal` in the scope.

- ``_middleware``: :class:`AuthMiddleware`, where the token is read (header, query, cookie).
- ``_tokens``: :class:`TokenValidator`, JWTs and introspection, and the principal of claims.
- ``_keys``: :class:`KeyStore`, the issuer's keys.
- ``_dev``: :func:`dev_token`, for deployments that trust a local key file.
"""

from ._dev import dev_token
from ._keys import KeyStore, read_jwks
from ._middleware import AuthMiddleware
from ._tokens import TokenValidator, principal_from_claims

__all__ = [
    "AuthMiddleware",
    "KeyStore",
    "TokenValidator",
    "dev_token",
    "principal_from_claims",
    "read_jwks",
]
