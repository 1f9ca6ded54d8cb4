"""The vocabulary of access decisions (DESIGN §4, §5): actions, what a principal may see, the
policy protocol every backend implements, and its simplest form.

Actions: ``read`` (search, metadata, frames, rendered, thumbnails, bulk data), ``download``
(Part 10 retrieve, when ``[access] retrieve_action = "download"``), ``write`` (STOW). A grant
of ``download`` also allows ``read``; ``write`` allows nothing else.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Final, Literal, Protocol, runtime_checkable

from .._scope import LinkGrant, Principal

__all__ = [
    "ACTIONS",
    "ALL",
    "AccessPolicy",
    "Action",
    "AllowAll",
    "Everything",
    "LinkPolicy",
    "Visible",
    "grant_covers",
    "user_key",
    "within",
]

Action = Literal["read", "download", "write"]
ACTIONS: Final[tuple[Action, ...]] = ("read", "download", "write")


class Everything:
    """The answer of :meth:`AccessPolicy.visible` for a principal who sees every examination."""

    _instance: Everything | None = None

    def __new__(cls) -> Everything:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ALL"


ALL: Final = Everything()

#: Every examination, or the IDs of those visible.
Visible = Everything | frozenset[int]


def grant_covers(granted: Action, wanted: Action) -> bool:
    """Whether a grant of ``granted`` allows ``wanted`` (``download`` includes ``read``)."""
    return granted == wanted or (granted == "download" and wanted == "read")


@runtime_checkable
class AccessPolicy(Protocol):
    """Who may do what on which examination. Implementations must be safe to call concurrently
    and must raise (never answer "allowed") when they cannot decide."""

    async def visible(self, principal: Principal, action: Action) -> Visible:
        """Every examination ``principal`` may ``action``: :data:`ALL`, or their IDs."""
        ...

    async def allowed(
        self, principal: Principal, action: Action, exam_ids: Collection[int]
    ) -> frozenset[int]:
        """The subset of ``exam_ids`` that ``principal`` may ``action``."""
        ...


class AllowAll:
    """``[access] backend = "allow_all"``: every authenticated caller may do everything."""

    async def visible(self, principal: Principal, action: Action) -> Visible:
        return ALL

    async def allowed(
        self, principal: Principal, action: Action, exam_ids: Collection[int]
    ) -> frozenset[int]:
        return frozenset(exam_ids)


class LinkPolicy:
    """The rights of a signed link, whatever the backends say: its action (``download``
    includes ``read``) on its one examination, nothing else; never ``write``."""

    def __init__(self, link: LinkGrant) -> None:
        self.link = link

    def _covers(self, action: Action) -> bool:
        granted: Action = "download" if self.link.action == "download" else "read"
        return grant_covers(granted, action)

    async def visible(self, principal: Principal, action: Action) -> Visible:
        return frozenset({self.link.exam}) if self._covers(action) else frozenset()

    async def allowed(
        self, principal: Principal, action: Action, exam_ids: Collection[int]
    ) -> frozenset[int]:
        if not self._covers(action):
            return frozenset()
        return frozenset(e for e in exam_ids if e == self.link.exam)


def user_key(principal: Principal) -> str:
    """The user a grant names: the principal's user ID (``[auth] user_claim``, Shanoir's
    ``userId``) when its token carries one, else its subject (``sub``)."""
    return principal.user_id or principal.subject


def within(visible: Visible, exam_ids: Iterable[int]) -> frozenset[int]:
    """The IDs of ``exam_ids`` that ``visible`` holds."""
    if isinstance(visible, frozenset):
        return visible.intersection(exam_ids)
    return frozenset(exam_ids)
