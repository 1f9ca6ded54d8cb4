"""The rewrite layer (DESIGN §2, §3): what the client says in public identifiers reaches the
PACS in its real UIDs, and what the PACS answers reaches the client in public identifiers.

- :class:`TranslationMiddleware`: paths, queries, every answer (``_middleware``, ``_responder``),
  through an :class:`IdentifierTranslator` (``_translator``).
- :class:`StowMiddleware`: uploads, instance by instance (``_stow``).
- :class:`RewriteMiddleware`: links only, when identifiers are not translated (``_links``).
"""

from ._links import LinkRewriter, RewriteMiddleware
from ._middleware import TranslationMiddleware
from ._stow import (
    CANNOT_UNDERSTAND,
    NOT_AUTHORIZED,
    PROCESSING_FAILURE,
    StowMiddleware,
)
from ._translator import IdentifierTranslator

__all__ = [
    "CANNOT_UNDERSTAND",
    "NOT_AUTHORIZED",
    "PROCESSING_FAILURE",
    "IdentifierTranslator",
    "LinkRewriter",
    "RewriteMiddleware",
    "StowMiddleware",
    "TranslationMiddleware",
]
