"""A platform's own identifier map and access policy, given to the proxy in Python.

A platform that keeps its examinations and rights in its own database, or behind its own API,
can answer the proxy's two questions itself instead of implementing the HTTP contracts of
docs/backends.md and docs/access.md:

- an ``IdentifierMap``: which real study and series UIDs are which examination and
  acquisition IDs, a whole batch at a time, in both directions;
- an ``AccessPolicy``: which examinations a user may read, download or write.

Both classes here answer from records held in memory; a real platform queries its database or
its API client in the same methods, without blocking the event loop. ``[mapping] backend`` and
``[access] backend`` are then ignored; ``[mapping] study_root``, ``series_root`` and
``unmapped_series`` still apply. Run it with any settings file whose roots differ:

    PROXY_CONFIG=proxy.toml hypercorn 'examples.custom_backend:create_proxy()'
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from shanoir_dicomweb_proxy import (
    ALL,
    Action,
    DicomWebProxy,
    Principal,
    SeriesEntry,
    Settings,
    Visible,
)


@dataclass(frozen=True)
class Examination:
    """An examination as the platform records it: its study and its acquisitions' series."""

    exam_id: int
    study_uid: str
    #: acquisition ID -> real series UID
    acquisitions: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Grant:
    """``user`` may do ``action`` on ``exam_ids`` (``None``: on every examination)."""

    user: str  # the token's [auth] user_claim (Shanoir's userId), else its sub
    action: Action
    exam_ids: frozenset[int] | None


class PlatformIdentifiers:
    """An ``IdentifierMap``: batched lookups that leave out what they do not know."""

    def __init__(self, examinations: Iterable[Examination]) -> None:
        self._study_uid: dict[int, str] = {}
        self._exam_id: dict[str, int] = {}
        self._series_by_id: dict[int, SeriesEntry] = {}
        self._series_by_uid: dict[str, SeriesEntry] = {}
        for exam in examinations:
            self._study_uid[exam.exam_id] = exam.study_uid
            self._exam_id[exam.study_uid] = exam.exam_id
            for acquisition_id, series_uid in exam.acquisitions.items():
                entry = SeriesEntry(acquisition_id, exam.exam_id, series_uid)
                self._series_by_id[acquisition_id] = entry
                self._series_by_uid[series_uid] = entry

    async def studies_by_uid(self, uids: Collection[str]) -> Mapping[str, int]:
        return {uid: self._exam_id[uid] for uid in uids if uid in self._exam_id}

    async def studies_by_id(self, exam_ids: Collection[int]) -> Mapping[int, str]:
        return {i: self._study_uid[i] for i in exam_ids if i in self._study_uid}

    async def series_by_uid(self, uids: Collection[str]) -> Mapping[str, SeriesEntry]:
        return {uid: self._series_by_uid[uid] for uid in uids if uid in self._series_by_uid}

    async def series_by_id(self, acquisition_ids: Collection[int]) -> Mapping[int, SeriesEntry]:
        return {i: self._series_by_id[i] for i in acquisition_ids if i in self._series_by_id}


class PlatformAccess:
    """An ``AccessPolicy``: a grant of ``download`` also allows ``read``, as everywhere in the
    proxy. Administrators (``[auth] admin_roles``) never reach it: the proxy lets them through.

    A policy that cannot decide (its database is down) must raise, for instance
    ``shanoir_dicomweb_proxy.AccessUnavailable`` (503), and never answer "allowed".
    """

    def __init__(self, grants: Iterable[Grant]) -> None:
        self._grants = list(grants)

    async def visible(self, principal: Principal, action: Action) -> Visible:
        exams: set[int] = set()
        for grant in self._grants_for(principal, action):
            if grant.exam_ids is None:
                return ALL
            exams |= grant.exam_ids
        return frozenset(exams)

    async def allowed(
        self, principal: Principal, action: Action, exam_ids: Collection[int]
    ) -> frozenset[int]:
        visible = await self.visible(principal, action)
        if isinstance(visible, frozenset):
            return visible.intersection(exam_ids)
        return frozenset(exam_ids)

    def _grants_for(self, principal: Principal, action: Action) -> Iterator[Grant]:
        user = principal.user_id or principal.subject
        for grant in self._grants:
            covers = grant.action == action or (grant.action == "download" and action == "read")
            if grant.user == user and covers:
                yield grant


EXAMINATIONS = [
    Examination(
        42,
        "1.2.840.113619.2.55.3.604688119.969.1268071029.320",
        {
            7: "1.2.840.113619.2.55.3.604688119.969.1268071029.321",
            8: "1.2.840.113619.2.55.3.604688119.969.1268071029.322",
        },
    ),
    Examination(43, "1.2.840.113619.2.55.3.604688119.969.1268071030.100"),
]

GRANTS = [
    Grant("7", "download", frozenset({42})),  # Shanoir user 7 views and downloads exam 42
    Grant("7", "write", frozenset({42})),  # ... and may store a SEG into it
    Grant("service-account-viewer", "read", None),  # a token without userId: its sub
]


def create_proxy(settings: Settings | None = None) -> DicomWebProxy:
    """The proxy with the platform's map and policy; ``PROXY_CONFIG`` names the settings file."""
    if settings is None:
        settings = Settings.from_toml(os.environ["PROXY_CONFIG"])
    return DicomWebProxy(
        settings,
        identifiers=PlatformIdentifiers(EXAMINATIONS),
        access=PlatformAccess(GRANTS),
    )
