"""shanoir-dicomweb-proxy: an authorizing, identifier-translating, streaming DICOMweb gateway.

``create_app(Settings.from_toml(path))`` returns the whole ASGI stack. The middlewares, the
protocols of the backends, the built-in backends and their caches are exported too, so that a
host application can compose its own stack (``docs/architecture.md``). Nothing else is public:
the ``_modules`` may change in any release.
"""

from ._access import ALL, AccessMiddleware, AccessPolicy, Action, AllowAll, AuditLog, Visible
from ._app import DicomWebProxy, create_app
from ._auth import AuthMiddleware, KeyStore, TokenValidator
from ._backends import (
    CachingAccessPolicy,
    CachingIdentifierMap,
    HttpAccessPolicy,
    HttpIdentifierMap,
    SqliteAccessPolicy,
    SqliteIdentifierMap,
    StaticAccessPolicy,
    StaticIdentifierMap,
    build_access_policy,
    build_identifier_map,
)
from ._config import (
    AccessSettings,
    AuthSettings,
    CorsSettings,
    IntrospectionSettings,
    LoggingSettings,
    MappingSettings,
    ServerSettings,
    Settings,
    StoreSettings,
    UpstreamAuthSettings,
    UpstreamSettings,
)
from ._errors import (
    AccessUnavailable,
    AuthUnavailable,
    BadRequest,
    ConfigError,
    Forbidden,
    InvalidToken,
    MappingUnavailable,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ._identifiers import IdentifierMap, SeriesEntry, UidFormatter
from ._observability import ObservabilityMiddleware
from ._problems import ErrorMiddleware
from ._request import DicomWebRequest, Level, Resource, Service
from ._rewrite import IdentifierTranslator, RewriteMiddleware, StowMiddleware, TranslationMiddleware
from ._routing import RoutingMiddleware
from ._scope import (
    Principal,
    RequestRecord,
    get_dicomweb_request,
    get_principal,
    get_record,
    set_principal,
)
from ._store import SqliteStore, StoreError
from ._upstream import Upstream, UpstreamProxy
from ._version import __version__

__all__ = [
    "ALL",
    "AccessMiddleware",
    "AccessPolicy",
    "AccessSettings",
    "AccessUnavailable",
    "Action",
    "AllowAll",
    "AuditLog",
    "AuthMiddleware",
    "AuthSettings",
    "AuthUnavailable",
    "BadRequest",
    "CachingAccessPolicy",
    "CachingIdentifierMap",
    "ConfigError",
    "CorsSettings",
    "DicomWebProxy",
    "DicomWebRequest",
    "ErrorMiddleware",
    "Forbidden",
    "HttpAccessPolicy",
    "HttpIdentifierMap",
    "IdentifierMap",
    "IdentifierTranslator",
    "IntrospectionSettings",
    "InvalidToken",
    "KeyStore",
    "Level",
    "LoggingSettings",
    "MappingSettings",
    "MappingUnavailable",
    "MethodNotAllowed",
    "NotAcceptable",
    "NotFound",
    "ObservabilityMiddleware",
    "PayloadTooLarge",
    "Principal",
    "ProxyError",
    "RequestRecord",
    "Resource",
    "RewriteMiddleware",
    "RoutingMiddleware",
    "SeriesEntry",
    "ServerSettings",
    "Service",
    "Settings",
    "SqliteAccessPolicy",
    "SqliteIdentifierMap",
    "SqliteStore",
    "StaticAccessPolicy",
    "StaticIdentifierMap",
    "StoreError",
    "StoreSettings",
    "StowMiddleware",
    "TokenValidator",
    "TranslationMiddleware",
    "UidFormatter",
    "UnsupportedMediaType",
    "Upstream",
    "UpstreamAuthSettings",
    "UpstreamError",
    "UpstreamProxy",
    "UpstreamRejected",
    "UpstreamSettings",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "Visible",
    "build_access_policy",
    "build_identifier_map",
    "create_app",
    "get_dicomweb_request",
    "get_principal",
    "get_record",
    "set_principal",
    "__version__",
]
