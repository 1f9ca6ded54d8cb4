"""The upstream PACS (DESIGN §6): the proxy's one streaming HTTP client (:class:`Upstream`,
``_client``, over the transport ``bench/`` chose, ``_transport``) and the innermost ASGI app
that forwards each parsed request to it (:class:`UpstreamProxy`, ``_proxy``)."""

from ._client import Upstream, upstream_error
from ._proxy import UpstreamProxy
from ._transport import AiohttpTransport

__all__ = ["AiohttpTransport", "Upstream", "UpstreamProxy", "upstream_error"]
