"""The access layer (DESIGN §4, §5): decisions per examination on every request.

- ``_policy``: the vocabulary every policy backend speaks (:class:`AccessPolicy`, actions,
  :data:`ALL`), and :class:`AllowAll`.
- ``_middleware``: :class:`AccessMiddleware`, the layer itself.
- ``_search``: searches filtered to visible examinations with exact paging.
- ``_audit``: the audit log.
"""

from ._audit import AuditLog, AuditRecord
from ._middleware import DENIED, INJECT_MAX, AccessMiddleware
from ._policy import (
    ACTIONS,
    ALL,
    AccessPolicy,
    Action,
    AllowAll,
    Everything,
    LinkPolicy,
    Visible,
    grant_covers,
    user_key,
    within,
)
from ._search import FILTER_PAGE

__all__ = [
    "ACTIONS",
    "ALL",
    "DENIED",
    "FILTER_PAGE",
    "INJECT_MAX",
    "AccessMiddleware",
    "AccessPolicy",
    "Action",
    "AllowAll",
    "AuditLog",
    "AuditRecord",
    "Everything",
    "LinkPolicy",
    "Visible",
    "grant_covers",
    "user_key",
    "within",
]
