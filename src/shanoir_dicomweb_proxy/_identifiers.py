"""Identifiers: the platform's examination and acquisition IDs, their public UIDs, and the map
between them and the PACS's real UIDs (DESIGN §3).

Backends speak domain IDs (integers, as in Shanoir-NG): an examination is a DICOM study, an
acquisition a DICOM series. Clients only see public UIDs (``[mapping] study_root`` and
``series_root`` followed by the ID); the PACS only ever sees its own UIDs.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

__all__ = [
    "MAX_ID",
    "ExamSeries",
    "ExamSubjects",
    "IdentifierMap",
    "SeriesEntry",
    "SeriesRegistrar",
    "UidFormatter",
    "is_domain_id",
    "is_uid",
]

#: The largest domain ID: SQLite's INTEGER, and Shanoir's Java ``long``.
MAX_ID: Final = 2**63 - 1

_DIGITS = re.compile(r"[1-9][0-9]{0,19}")
# PS3.5 §9.1: digits and dots, at most 64 characters. Leading zeros in components are not
# valid DICOM, but archives hold such UIDs, so they are accepted.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def is_uid(value: object) -> bool:
    """Whether ``value`` is a string that can be a UID (digits and dots, at most 64)."""
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


def is_domain_id(value: object) -> bool:
    """Whether ``value`` is an examination or acquisition ID: an int in 1..:data:`MAX_ID`."""
    return type(value) is int and 0 < value <= MAX_ID


@dataclass(frozen=True, slots=True)
class SeriesEntry:
    """A series the map knows: its acquisition ID, its examination, and its real UID."""

    acquisition_id: int
    exam_id: int
    series_uid: str


@runtime_checkable
class IdentifierMap(Protocol):
    """Batched lookups between real UIDs and domain IDs, in both directions.

    Every method takes a whole batch (a page of 1000 QIDO rows is one call) and leaves out of
    its answer what it does not know. Implementations must be safe to call concurrently.
    """

    async def studies_by_uid(self, uids: Collection[str]) -> Mapping[str, int]:
        """Real study UID → examination ID."""
        ...

    async def studies_by_id(self, exam_ids: Collection[int]) -> Mapping[int, str]:
        """Examination ID → real study UID."""
        ...

    async def series_by_uid(self, uids: Collection[str]) -> Mapping[str, SeriesEntry]:
        """Real series UID → its entry."""
        ...

    async def series_by_id(self, acquisition_ids: Collection[int]) -> Mapping[int, SeriesEntry]:
        """Acquisition ID → its entry."""
        ...


@runtime_checkable
class ExamSeries(Protocol):
    """An identifier map for platforms where one real study holds several examinations
    (Shanoir's copies): within an examination's path, its own series are asked of it."""

    async def series_of_exam(self, exam_id: int) -> tuple[Mapping[str, SeriesEntry], bool]:
        """The examination's series (real series UID → entry), and whether they are all it
        holds: then any other series of its study is another examination's, never shown under
        this one."""
        ...

    async def exams_of_studies(self, study_uids: Collection[str]) -> Mapping[str, tuple[int, ...]]:
        """Every examination each real study holds, for the caller (a search lists each as a
        study of its own)."""
        ...


@runtime_checkable
class ExamSubjects(Protocol):
    """An identifier map whose examinations may show a name other than the PACS's in
    PatientName and PatientID (Shanoir's copies show their own subject's)."""

    async def subject_names(self, exam_ids: Collection[int]) -> Mapping[int, str]:
        """The name to show for those of ``exam_ids`` that show another than the PACS's."""
        ...


#: Registers a real series UID under an examination (a series a viewer uploaded).
SeriesRegistrar = Callable[[int, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class UidFormatter:
    """Public UIDs from domain IDs and back: ``root.ID``, or the bare ID when the root is empty.

    Exam 42 with study root ``1.4.9.12.34.1.8527`` is ``1.4.9.12.34.1.8527.42``, as Shanoir's
    front end builds it. Parsing is strict: anything that is not exactly a root followed by a
    positive ID without leading zeros is not a public UID (a real UID passed as if it were
    public is not a back door).
    """

    study_root: str
    series_root: str

    def study_uid(self, exam_id: int) -> str:
        return _format(self.study_root, exam_id)

    def series_uid(self, acquisition_id: int) -> str:
        return _format(self.series_root, acquisition_id)

    def exam_id(self, public_uid: str) -> int | None:
        """The examination ID a public study UID names, or None."""
        return _parse(self.study_root, public_uid)

    def acquisition_id(self, public_uid: str) -> int | None:
        """The acquisition ID a public series UID names, or None."""
        return _parse(self.series_root, public_uid)


def _format(root: str, value: int) -> str:
    if value <= 0:
        raise ValueError(f"domain IDs are positive integers, got {value}")
    return f"{root}.{value}" if root else str(value)


def _parse(root: str, uid: str) -> int | None:
    prefix = root + "." if root else ""
    if not uid.startswith(prefix):
        return None
    tail = uid[len(prefix) :]
    return int(tail) if _DIGITS.fullmatch(tail) else None
