"""Public UIDs to real ones and back, through an identifier map and the public UID format."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from .._dicom import UidCollector
from .._errors import NotFound
from .._identifiers import ExamSeries, ExamSubjects, IdentifierMap, SeriesEntry, UidFormatter
from .._request import DicomWebRequest, Resource, is_series_key, is_study_key, split_uid_list

__all__ = ["IdentifierTranslator", "Known", "NothingMatches"]


class NothingMatches(Exception):
    """A search for identifiers none of which exist: the answer is empty."""


@dataclass(frozen=True, slots=True)
class Known:
    """Real ↔ public pairs learned while translating one request, and the examination of
    each real study and series UID."""

    studies: dict[str, str]
    series: dict[str, str]
    exams: dict[str, int] = field(default_factory=dict)
    #: The series of the path stands for itself (``unmapped_series = "expose"``): the map
    #: cannot say which study it belongs to.
    unmapped_series: bool = False
    #: The examination of the path, if any.
    exam: int | None = None
    #: Real series UIDs the map knows but that are not shown here.
    hidden: set[str] = field(default_factory=set)
    #: The name PatientName and PatientID show, by examination, when not the PACS's.
    subjects: dict[int, str | None] = field(default_factory=dict)
    #: The examinations a search asked for, by real study UID.
    asked: dict[str, set[int]] = field(default_factory=dict)
    #: UI values of other attributes looked up and found to be no study or series the map
    #: knows (SOP Instance UIDs, Frame of Reference UIDs...): not asked for again.
    unrelated: set[str] = field(default_factory=set)


class IdentifierTranslator:
    """Public UIDs ↔ real UIDs through an :class:`IdentifierMap` and a :class:`UidFormatter`."""

    def __init__(
        self,
        identifiers: IdentifierMap,
        formatter: UidFormatter,
        *,
        expose_unmapped: bool,
        exam_series: ExamSeries | None = None,
        exam_subjects: ExamSubjects | None = None,
    ) -> None:
        self.identifiers = identifiers
        self.formatter = formatter
        self.expose_unmapped = expose_unmapped
        #: Asked for the series of the path's examination, when the map is one that holds
        #: several examinations in one real study.
        self.exam_series = exam_series
        #: Asked for the name of examinations that show another than the PACS's.
        self.exam_subjects = exam_subjects

    async def real_studies(self, public: Iterable[str]) -> dict[str, str]:
        """Public study UID → real study UID, for the known ones."""
        ids = {uid: self.formatter.exam_id(uid) for uid in public}
        wanted = {i for i in ids.values() if i is not None}
        found = await self.identifiers.studies_by_id(wanted) if wanted else {}
        return {uid: found[i] for uid, i in ids.items() if i is not None and i in found}

    async def real_series(self, public: Iterable[str], *, exam_id: int | None) -> dict[str, str]:
        """Public series UID → real series UID, for the known ones (in ``exam_id`` if given).

        With ``unmapped_series = "expose"``, a value that is not a public UID stands for
        itself when the map does not know it as a real series UID either.
        """
        values = set(public)
        ids = {uid: self.formatter.acquisition_id(uid) for uid in values}
        wanted = {i for i in ids.values() if i is not None}
        entries = await self.identifiers.series_by_id(wanted) if wanted else {}
        result: dict[str, str] = {}
        for uid, i in ids.items():
            entry = entries.get(i) if i is not None else None
            if entry is not None and (exam_id is None or entry.exam_id == exam_id):
                result[uid] = entry.series_uid
        if self.expose_unmapped:
            others = {uid for uid, i in ids.items() if i is None}
            mapped = await self.identifiers.series_by_uid(others) if others else {}
            result.update((uid, uid) for uid in others if uid not in mapped)
        return result

    async def public(self, collector: UidCollector, known: Known) -> None:
        """Learn the public UIDs of what ``collector`` holds into ``known``; its ``others``
        are looked up as studies, then as series."""
        others = (
            collector.others
            - collector.studies
            - collector.series
            - known.studies.keys()
            - known.series.keys()
            - known.hidden
            - known.unrelated
        )
        studies = (collector.studies | others) - known.studies.keys()
        if studies:
            found = await self.identifiers.studies_by_uid(studies)
            for uid, exam_id in found.items():
                known.studies[uid] = self.formatter.study_uid(exam_id)
                known.exams[uid] = exam_id
            others -= found.keys()
        series = collector.series - known.series.keys() - known.hidden
        if (series or others) and self.exam_series is not None and known.exam is not None:
            own, alone = await self.exam_series.series_of_exam(known.exam)
            self._learn_series(known, {u: e for u, e in own.items() if u in series or u in others})
            series -= own.keys()
            others -= own.keys()
            if alone:  # the rest of its study is another examination's
                known.hidden.update(series)
                series = set()
        if series or others:
            self._learn_series(known, await self.identifiers.series_by_uid(series | others))
        known.unrelated.update(others - known.series.keys())

    async def patients(self, known: Known, studies: Iterable[str]) -> dict[str, str]:
        """Real study UID → the name its datasets show, for those of ``studies`` whose
        examination shows another than the PACS's."""
        if self.exam_subjects is None:
            return {}  # every examination shows the PACS's name: nothing to look up per batch
        names = await self.names(known, {known.exams[uid] for uid in studies if uid in known.exams})
        found = {uid: names.get(known.exams.get(uid, 0)) for uid in studies}
        return {uid: name for uid, name in found.items() if name is not None}

    async def names(self, known: Known, exam_ids: Iterable[int]) -> dict[int, str | None]:
        """Examination → the name its datasets show (None: the PACS's)."""
        wanted = set(exam_ids)
        missing = wanted - known.subjects.keys()
        if missing and self.exam_subjects is not None:
            found = await self.exam_subjects.subject_names(missing)
            known.subjects.update((exam, found.get(exam)) for exam in missing)
        return {exam: known.subjects.get(exam) for exam in wanted}

    def _learn_series(self, known: Known, entries: Mapping[str, SeriesEntry]) -> None:
        for uid, entry in entries.items():
            known.series[uid] = self.formatter.series_uid(entry.acquisition_id)
            known.exams[uid] = entry.exam_id

    async def translate_request(self, request: DicomWebRequest) -> tuple[DicomWebRequest, Known]:
        """The request with real UIDs; raises NotFound, or NothingMatches for a search."""
        known = Known({}, {})
        study = series = None
        exam_id = None
        if request.study is not None:
            found = await self.real_studies([request.study])
            study = found.get(request.study)
            if study is None:
                raise NotFound("no such study")
            exam_id = self.formatter.exam_id(request.study)
            assert exam_id is not None
            known.studies[study] = request.study
            known.exams[study] = exam_id
            known = replace(known, exam=exam_id)
        if request.series is not None:
            found = await self.real_series([request.series], exam_id=exam_id)
            series = found.get(request.series)
            if series is None:
                raise NotFound("no such series")
            if series == request.series:
                known = replace(known, unmapped_series=True)
            known.series[series] = request.series
            if exam_id is not None:
                known.exams[series] = exam_id
        query = request.query
        if request.resource is Resource.SEARCH:
            query = await self._translate_query(query, exam_id, known)
        return replace(request, study=study, series=series, query=query), known

    async def _translate_query(
        self, query: tuple[tuple[str, str], ...], exam_id: int | None, known: Known
    ) -> tuple[tuple[str, str], ...]:
        result: list[tuple[str, str]] = []
        for key, value in query:
            if is_study_key(key):
                values = split_uid_list(value)
                found = await self.real_studies(values)
                pairs = [(found[v], v) for v in values if v in found]
                # The answer names a study as it was asked for: of the examinations one real
                # study holds (copies), the one asked, when only one was; else the map picks.
                asked = Counter(real for real, _ in pairs)
                for real, public in pairs:
                    exam = self.formatter.exam_id(public)
                    if exam is None:
                        continue
                    known.asked.setdefault(real, set()).add(exam)
                    if asked[real] == 1 and real not in known.studies:
                        known.studies[real] = public
                        known.exams[real] = exam
            elif is_series_key(key):
                values = split_uid_list(value)
                found = await self.real_series(values, exam_id=exam_id)
                pairs = [(found[v], v) for v in values if v in found]
            else:
                result.append((key, value))
                continue
            if not pairs:
                raise NothingMatches
            result.append((key, ",".join(real for real, _ in pairs)))
        return tuple(result)
