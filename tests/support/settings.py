"""Settings shared by the tests that start a proxy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shanoir_dicomweb_proxy.testing import ProxyServer

# Identity mapping, no authentication: the gateway core on its own.
CORE_SETTINGS: dict[str, Any] = {
    "auth": {"enabled": False},
    "mapping": {"backend": "identity"},
    "access": {"backend": "allow_all"},
}

#: ``proxy_factory(upstream_url, **sections)`` (the fixture of ``conftest.py``).
ProxyFactory = Callable[..., ProxyServer]
