"""shanoir-dicomweb-proxy: an authorizing, identifier-translating, streaming DICOMweb gateway.

``create_app(Settings.from_toml(path))`` returns the whole ASGI stack. The middlewares are
exported too, so that a host application can compose its own stack.
"""

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
    BadRequest,
    ConfigError,
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
from ._rewrite import RewriteMiddleware
from ._routing import (
    DicomWebRequest,
    Level,
    Resource,
    RoutingMiddleware,
    Service,
    get_dicomweb_request,
)
from ._upstream import Upstream, UpstreamProxy

__version__ = "0.1.0.dev0"

__all__ = [
    "AccessSettings",
    "AuthMiddleware",
    "AuthUnavailable",
    "AuthSettings",
    "BadRequest",
    "ConfigError",
    "CorsSettings",
    "DicomWebProxy",
    "DicomWebRequest",
    "ErrorMiddleware",
    "IntrospectionSettings",
    "InvalidToken",
    "KeyStore",
    "Level",
    "LoggingSettings",
    "MappingSettings",
    "MethodNotAllowed",
    "NotAcceptable",
    "NotFound",
    "PayloadTooLarge",
    "Principal",
    "ProxyError",
    "Resource",
    "RewriteMiddleware",
    "RoutingMiddleware",
    "ServerSettings",
    "Service",
    "Settings",
    "StoreSettings",
    "TokenValidator",
    "UnsupportedMediaType",
    "Upstream",
    "UpstreamAuthSettings",
    "UpstreamError",
    "UpstreamProxy",
    "UpstreamRejected",
    "UpstreamSettings",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "__version__",
    "create_app",
    "get_dicomweb_request",
    "get_principal",
]
