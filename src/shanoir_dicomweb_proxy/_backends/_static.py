"""The ``static`` backends: an identifier map and grants read once from a file, held in memory.

- :class:`StaticIdentifierMap`: ``[mapping] file`` (``docs/backends.md``).
- :class:`StaticAccessPolicy`: ``[access] file`` (``docs/access.md``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .._access import ACTIONS, ALL, Action, Visible, grant_covers, user_key, within
from .._errors import ConfigError
from .._identifiers import SeriesEntry
from .._scope import Principal
from .._store import (
    ImportRow,
    StoreError,
    check_id,
    check_keys,
    check_row,
    check_uid,
    load_import_file,
)
from ._files import file_errors, file_items, read_document, read_json_object, read_text, read_toml

__all__ = ["StaticAccessPolicy", "StaticGrant", "StaticIdentifierMap"]

_K = TypeVar("_K")
_V = TypeVar("_V")

_EXAM_KEYS = frozenset({"id", "study_uid", "acquisitions"})
_ACQUISITION_KEYS = frozenset({"id", "series_uid"})
_GRANT_KEYS = frozenset({"user", "exams", "all", "actions"})


class StaticIdentifierMap:
    """An identifier map held in memory, from rows checked once: dictionary lookups.

    :meth:`from_file` reads the ``[mapping] file`` formats (``docs/backends.md``). An ID or UID
    bound twice, to the same or another value, is a :class:`ConfigError` naming both rows.
    """

    def __init__(self, rows: Iterable[ImportRow], *, source: str = "") -> None:
        self.source = source
        self._exam_ids: dict[str, int] = {}
        self._study_uids: dict[int, str] = {}
        self._series_by_uid: dict[str, SeriesEntry] = {}
        self._series_by_id: dict[int, SeriesEntry] = {}
        try:
            self._index(rows)
        except StoreError as exc:
            raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> StaticIdentifierMap:
        """Read a TOML file (by its ``.toml`` suffix), a JSON object of the same shape, or any
        file ``store import`` reads (a JSON array, or CSV).
        """
        path = Path(path)
        with file_errors(path):
            if path.suffix.lower() == ".toml":
                data = read_toml(path)
            else:
                text = read_text(path)
                if not text.lstrip().startswith("{"):
                    try:
                        rows = load_import_file(path)  # its messages name the file
                    except StoreError as exc:
                        raise ConfigError(str(exc)) from None
                    return cls(rows, source=str(path))
                data = read_json_object(text)
        return cls(_table_rows(data), source=str(path))

    def __repr__(self) -> str:
        return (
            f"StaticIdentifierMap({self.source!r}, {len(self._study_uids)} examinations, "
            f"{len(self._series_by_id)} acquisitions)"
        )

    def _index(self, rows: Iterable[ImportRow]) -> None:
        origin: dict[tuple[str, object], str] = {}  # which row bound an ID or UID first
        for number, row in enumerate(rows, 1):
            where = row.where or f"row {number}"
            check_row(row, where)
            exam_id, study_uid = row.exam_id, row.study_uid
            known = self._study_uids.get(exam_id)
            if known is not None and known != study_uid:
                raise StoreError(
                    f"{where}: examination {exam_id} is already study {known} "
                    f"({origin['exam', exam_id]}); this entry says study {study_uid}"
                )
            bound = self._exam_ids.get(study_uid)
            if bound is not None and bound != exam_id:
                raise StoreError(
                    f"{where}: study {study_uid} is already examination {bound} "
                    f"({origin['study', study_uid]}); this entry says examination {exam_id}"
                )
            if known is None:
                self._study_uids[exam_id] = study_uid
                self._exam_ids[study_uid] = exam_id
                origin["exam", exam_id] = origin["study", study_uid] = where
            if row.acquisition_id is None:
                # An examination on its own: once (flat rows repeat it once per acquisition).
                if ("alone", exam_id) in origin:
                    raise StoreError(
                        f"{where}: examination {exam_id} is listed twice "
                        f"(also {origin['alone', exam_id]})"
                    )
                origin["alone", exam_id] = where
                continue
            assert row.series_uid is not None
            entry = SeriesEntry(row.acquisition_id, exam_id, row.series_uid)
            if entry.acquisition_id in self._series_by_id:
                raise StoreError(
                    f"{where}: acquisition {entry.acquisition_id} is listed twice "
                    f"(also {origin['acquisition', entry.acquisition_id]})"
                )
            other = self._series_by_uid.get(entry.series_uid)
            if other is not None:
                raise StoreError(
                    f"{where}: series {entry.series_uid} is already acquisition "
                    f"{other.acquisition_id} ({origin['series', entry.series_uid]}); "
                    f"this entry says acquisition {entry.acquisition_id}"
                )
            self._series_by_id[entry.acquisition_id] = entry
            self._series_by_uid[entry.series_uid] = entry
            origin["acquisition", entry.acquisition_id] = origin["series", entry.series_uid] = where

    async def studies_by_uid(self, uids: Collection[str]) -> Mapping[str, int]:
        """Real study UID → examination ID."""
        return _pick(self._exam_ids, uids)

    async def studies_by_id(self, exam_ids: Collection[int]) -> Mapping[int, str]:
        """Examination ID → real study UID."""
        return _pick(self._study_uids, exam_ids)

    async def series_by_uid(self, uids: Collection[str]) -> Mapping[str, SeriesEntry]:
        """Real series UID → its entry."""
        return _pick(self._series_by_uid, uids)

    async def series_by_id(self, acquisition_ids: Collection[int]) -> Mapping[int, SeriesEntry]:
        """Acquisition ID → its entry."""
        return _pick(self._series_by_id, acquisition_ids)


def _pick(table: Mapping[_K, _V], keys: Collection[_K]) -> dict[_K, _V]:
    return {key: table[key] for key in keys if key in table}


def _table_rows(data: Any) -> Iterator[ImportRow]:
    """The rows of ``{"examinations": [{"id", "study_uid", "acquisitions": [...]}]}``."""
    what = "an examination (id, study_uid, acquisitions)"
    for where, exam in file_items(data, "examinations", _EXAM_KEYS, what):
        exam_id: Any = exam.get("id")
        study_uid: Any = exam.get("study_uid")
        check_id(where, "id", exam_id)
        check_uid(where, "study_uid", study_uid)
        yield ImportRow(exam_id, study_uid, where=where)
        acquisitions = exam.get("acquisitions", [])
        if not isinstance(acquisitions, list):
            raise StoreError(f"{where}: acquisitions: expected an array")
        for number, acquisition in enumerate(acquisitions, 1):
            inner = f"{where}, acquisition {number}"
            if not isinstance(acquisition, dict):
                raise StoreError(f"{inner}: expected an acquisition (id, series_uid)")
            check_keys(inner, acquisition, _ACQUISITION_KEYS)
            acquisition_id, series_uid = acquisition.get("id"), acquisition.get("series_uid")
            check_id(inner, "id", acquisition_id)
            check_uid(inner, "series_uid", series_uid)
            yield ImportRow(exam_id, study_uid, acquisition_id, series_uid, where=inner)


@dataclass(frozen=True, slots=True)
class StaticGrant:
    """``user`` may do ``actions`` on ``exams`` (:data:`ALL`: on every examination)."""

    user: str
    actions: frozenset[Action]
    exams: Visible


class StaticAccessPolicy:
    """Grants held in memory: dictionary lookups.

    :meth:`from_file` reads ``[access] file`` (``docs/access.md``). Grants of the same user add
    up; a ``download`` grant also allows ``read``.
    """

    def __init__(self, grants: Iterable[StaticGrant], *, source: str = "") -> None:
        self.source = source
        self._visible: dict[tuple[str, Action], Visible] = {}
        for grant in grants:
            for wanted in ACTIONS:
                if any(grant_covers(granted, wanted) for granted in grant.actions):
                    key = grant.user, wanted
                    known, exams = self._visible.get(key, frozenset()), grant.exams
                    if isinstance(known, frozenset) and isinstance(exams, frozenset):
                        self._visible[key] = known | exams
                    else:
                        self._visible[key] = ALL

    @classmethod
    def from_file(cls, path: str | Path) -> StaticAccessPolicy:
        """Read a TOML file (by its ``.toml`` suffix) or a JSON object of the same shape."""
        path = Path(path)
        data = read_document(path)
        with file_errors(path):
            grants = list(_static_grants(data))
        return cls(grants, source=str(path))

    def __repr__(self) -> str:
        users = len({user for user, _ in self._visible})
        return f"StaticAccessPolicy({self.source!r}, {users} users)"

    async def visible(self, principal: Principal, action: Action) -> Visible:
        """Every examination the file grants the principal's user for ``action``."""
        return self._visible.get((user_key(principal), action), frozenset())

    async def allowed(
        self, principal: Principal, action: Action, exam_ids: Collection[int]
    ) -> frozenset[int]:
        """The subset of ``exam_ids`` the file grants the principal's user for ``action``."""
        return within(await self.visible(principal, action), exam_ids)


def _static_grants(data: Any) -> Iterator[StaticGrant]:
    """The grants of ``{"grants": [{"user", "actions", "exams" | "all"}]}``; StoreError."""
    what = "a grant (user, actions, exams or all)"
    for where, item in file_items(data, "grants", _GRANT_KEYS, what):
        user = item.get("user")
        if not isinstance(user, str) or not user or user != user.strip():
            raise StoreError(
                f'{where}: user: expected a user ID or subject as a string (user = "7"), '
                f"got {user!r}"
            )
        actions = item.get("actions")
        if (
            not isinstance(actions, list)
            or not actions
            or not all(action in ACTIONS for action in actions)
        ):
            raise StoreError(
                f"{where}: actions: expected a list of {', '.join(ACTIONS)}, got {actions!r}"
            )
        yield StaticGrant(user, frozenset(actions), _static_exams(item, where))


def _static_exams(item: dict[str, Any], where: str) -> Visible:
    everything = item.get("all", False)
    if not isinstance(everything, bool):
        raise StoreError(f"{where}: all: expected true or false, got {everything!r}")
    if everything == ("exams" in item):
        raise StoreError(f"{where}: expected either exams (a list of IDs) or all = true")
    if everything:
        return ALL
    exams = item["exams"]
    if not isinstance(exams, list):
        raise StoreError(f"{where}: exams: expected a list of examination IDs, got {exams!r}")
    for exam_id in exams:
        check_id(where, "exams", exam_id)
    return frozenset(exams)
