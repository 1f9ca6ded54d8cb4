"""shanoir-dicomweb-proxy: an authorizing, identifier-translating, streaming DICOMweb gateway.

``create_app(Settings.from_toml(path))`` returns the whole ASGI stack. The middlewares are
exported too, so that a host application can compose its own stack.
"""

from ._access import ALL, AccessMiddleware, AccessPolicy, Action, AllowAll, AuditLog, Visible
from ._app import DicomWebProxy, create_app
from ._auth import (
    AuthMiddleware,
    AuthUnavailable,
    InvalidToken,
    KeyStore,
    Principal,
    TokenValidator,
    get_principal,
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
from ._edge import ErrorMiddleware
from ._errors import (
    AccessUnavailable,
    BadRequest,
    ConfigError,
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
from ._rewrite import RewriteMiddleware
from ._routing import (
    DicomWebRequest,
    Level,
    Resource,
    RoutingMiddleware,
    Service,
    get_dicomweb_request,
)
from ._translating import IdentifierTranslator, TranslationMiddleware
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
    "ConfigError",
    "CorsSettings",
    "DicomWebProxy",
    "DicomWebRequest",
    "ErrorMiddleware",
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
    "Resource",
    "RewriteMiddleware",
    "RoutingMiddleware",
    "SeriesEntry",
    "ServerSettings",
    "Service",
    "Settings",
    "StoreSettings",
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
    "create_app",
    "get_dicomweb_request",
    "get_principal",
    "__version__",
]
