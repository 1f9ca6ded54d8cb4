"""The rules of identifier translation, whatever the representation (DESIGN §3).

Every representation (DICOM JSON, DICOM XML, Part 10) offers its datasets through the small
:class:`DatasetView` interface; the rules live here, once:

- (0020,000D) Study Instance UID and (0020,000E) Series Instance UID are translated at every
  depth, and so is (0008,1155) inside (0008,1110) Referenced Study Sequence items (where it
  holds a study UID).
- Any other UI-valued element whose value is a real study or series UID (a Frame of Reference
  UID equal to the study's, a series in a reference of another kind) is translated to the same
  public UID, at every depth; it is emptied when that study or series is not shown. Values
  under the DICOM standard's root (``1.2.840.10008.``: SOP classes, transfer syntaxes) are
  never study or series UIDs and are not looked up.
- A study the map does not know is never shown: a top-level dataset (a search row, an
  instance) of an unknown study is dropped; a nested reference to one is emptied.
- A series the map does not know is shown as it is (``unmapped_series = "expose"``) inside a
  study the map knows, and treated like an unknown study otherwise.
- Links (RetrieveURL, BulkDataURI) name studies and series in their paths: those are
  translated the same way, and a link to something unknown is removed.
- A dataset of a study whose examination shows another name (a copy's subject) gets that name
  in PatientName and PatientID, where it holds them.
- A study-level search row of a real study that several examinations hold (copies) is listed
  once per examination the caller may see (:meth:`Translation.for_copy`).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from ._tags import (
    PATIENT_ID,
    PATIENT_NAME,
    REFERENCED_SOP_INSTANCE_UID,
    REFERENCED_STUDY_SEQUENCE,
    RETRIEVE_URL,
    SERIES_INSTANCE_UID,
    SOP_INSTANCE_UID,
    STUDY_INSTANCE_UID,
)

__all__ = [
    "TRANSLATED_TAGS",
    "UID_IN_TEXT",
    "DatasetView",
    "Resolve",
    "Translation",
    "UidCollector",
    "apply_translation",
    "collect_uids",
    "copies_of",
]

#: The tags whose values this module may change besides the UI-valued elements (any of which
#: may hold a study or series UID); a representation may skip everything else.
TRANSLATED_TAGS = frozenset(
    {STUDY_INSTANCE_UID, SERIES_INSTANCE_UID, REFERENCED_SOP_INSTANCE_UID, RETRIEVE_URL}
    | {PATIENT_NAME, PATIENT_ID}
)


class DatasetView(Protocol):
    """One dataset (a top-level one or a sequence item) of some representation."""

    def get(self, tag: int) -> list[str] | None:
        """The values of a string element at this level (padding stripped), or None."""
        ...

    def put(self, tag: int, values: list[str] | None) -> None:
        """Replace the values of an element :meth:`get` returned; None empties it. A person
        name (PN) is given as text (``FAMILY^GIVEN``), in the representation's own form."""
        ...

    def sequences(self) -> Iterable[tuple[int, Iterable[DatasetView]]]:
        """Every sequence element at this level, as (tag, its items)."""
        ...

    def uid_tags(self) -> Iterable[int]:
        """The tags of the UI-valued elements at this level (:meth:`get` reads them)."""
        ...

    def map_links(self, rewrite: Callable[[str], str | None]) -> None:
        """Apply ``rewrite`` to the links held at this level other than RetrieveURL (JSON's
        BulkDataURI attributes, XML's BulkData elements); None removes the link."""
        ...


@dataclass(slots=True)
class UidCollector:
    """Real UIDs met in datasets, gathered to be looked up in one batch: ``studies`` and
    ``series`` where the attribute says which, ``others`` (any other UI value) where either
    may be."""

    studies: set[str] = field(default_factory=set)
    series: set[str] = field(default_factory=set)
    others: set[str] = field(default_factory=set)
    #: The parts of links before their instance already looked through (see _link_head).
    _heads: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def add_link(self, url: str) -> None:
        head = _link_head(url)
        if head is not None:
            if head in self._heads:
                return
            if len(self._heads) < _HEADS_KEPT:
                self._heads.add(head)
            url = head
        for kind, uid in _LINK_UID.findall(url):
            (self.studies if kind == "studies" else self.series).add(uid)

    def __bool__(self) -> bool:
        return bool(self.studies or self.series or self.others)


@dataclass(frozen=True, slots=True)
class Translation:
    """What a batch lookup found: real UID → public UID, for the known ones only.

    ``upstream_base`` and ``public_base`` are the link prefixes to swap; ``expose_unmapped``
    is ``[mapping] unmapped_series == "expose"``; ``hidden`` are real study and series UIDs
    that must not be shown here (another examination's, one the caller may not see, a study the
    map does not know): never shown as unmapped either; ``unmapped`` are real series UIDs met
    that the map does not know (shown as they are only where ``expose_unmapped`` shows them).
    ``patients`` gives, by real study UID, the name PatientName and PatientID show instead of
    the PACS's (a copied examination's subject). ``copies`` names, by real study UID, the other
    examinations a study-level search row stands for: each is listed as a row of its own, with
    its public UID and its name (None: the PACS's).
    """

    studies: Mapping[str, str]
    series: Mapping[str, str]
    expose_unmapped: bool = True
    upstream_base: str = ""
    public_base: str = ""
    hidden: frozenset[str] = frozenset()
    unmapped: frozenset[str] = frozenset()
    patients: Mapping[str, str] = field(default_factory=dict)
    copies: Mapping[str, tuple[tuple[str, str | None], ...]] = field(default_factory=dict)
    #: The swapped heads of the links met (see _link_head), by head and study_known.
    _heads: dict[tuple[str, bool], str | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def for_copy(self, study: str, public: str, name: str | None) -> Translation:
        """This translation, with ``study`` (a real UID) shown as ``public`` named ``name``."""
        patients = {k: v for k, v in self.patients.items() if k != study}
        if name is not None:
            patients[study] = name
        return replace(self, studies={**self.studies, study: public}, patients=patients, copies={})

    def study(self, uid: str) -> str | None:
        return self.studies.get(uid)

    def series_uid(self, uid: str, *, study_known: bool) -> str | None:
        public = self.series.get(uid)
        if public is not None:
            return public
        if uid in self.hidden:
            return None
        return uid if study_known and self.expose_unmapped else None

    def other_uid(self, uid: str, *, study_known: bool) -> str | None:
        """The public form of a UI value of another attribute: the public UID of the study or
        series it is, None when that is not shown, else the value itself."""
        public = self.studies.get(uid) or self.series.get(uid)
        if public is not None:
            return public
        if uid in self.hidden:
            return None
        if uid in self.unmapped:
            return self.series_uid(uid, study_known=study_known)
        return uid

    def link(self, url: str, *, study_known: bool) -> str | None:
        """The public form of an upstream link, or None when it names something unknown."""
        head = _link_head(url)
        if head is None:
            rewritten = self._swap_uids(url, study_known)
        else:
            key = (head, study_known)
            try:
                swapped = self._heads[key]
            except KeyError:
                swapped = self._swap_uids(head, study_known)
                if len(self._heads) < _HEADS_KEPT:  # a long-lived one may meet any number
                    self._heads[key] = swapped
            rewritten = None if swapped is None else swapped + url[len(head) :]
        if rewritten is None:
            return None
        if self.upstream_base and rewritten.startswith(self.upstream_base):
            rewritten = self.public_base + rewritten[len(self.upstream_base) :]
        return rewritten

    def _swap_uids(self, url: str, study_known: bool) -> str | None:
        """``url`` with the study and series of its path public, or None if one is unknown."""
        unknown = False

        def swap(match: re.Match[str]) -> str:
            nonlocal unknown
            kind, uid = match.group(1), match.group(2)
            if kind == "studies":
                public = self.study(uid)
            else:
                public = self.series_uid(uid, study_known=study_known)
            if public is None:
                unknown = True
                return match.group(0)
            return f"/{kind}/{public}"

        rewritten = _LINK_UID.sub(swap, url)
        return None if unknown else rewritten


_LINK_UID = re.compile(r"/(studies|series)/([0-9.]+)")
#: Link heads a translation remembers: an answer's links name a few series.
_HEADS_KEPT = 256


def _link_head(url: str) -> str | None:
    """What precedes the instance in a link whose rest names no study or series, else None.

    Every instance of an answer has links (BulkDataURI, RetrieveURL) under the same study and
    series: looked up and swapped once per answer through this part, not once per link. A
    study or series segment cannot straddle the cut (its UID ends at the next "/")."""
    cut = url.find("/instances/")
    if cut < 0:
        return None
    rest = url[cut:]
    if "/studies/" in rest or "/series/" in rest:
        return None
    return url[:cut]


#: The root of the UIDs the DICOM standard defines (PS3.6 Annex A): never an archive's.
_STANDARD_ROOT = "1.2.840.10008."
#: Tags whose values are not looked up as other UIDs: the study and series UIDs themselves, and
#: an instance's own SOP Instance UID (the bulk of an answer's UI values), which DICOM's
#: uniqueness keeps from ever equalling a study or series UID; looking each up would cost the
#: `shanoir` map a PACS search per batch. References (0008,1155) are still looked up.
_OWN_TAGS = frozenset({STUDY_INSTANCE_UID, SERIES_INSTANCE_UID, SOP_INSTANCE_UID})

#: Looks up what a collector gathered, in one batch.
Resolve = Callable[[UidCollector], Awaitable[Translation]]


def collect_uids(dataset: DatasetView, into: UidCollector) -> None:
    """Gather the study and series UIDs of ``dataset`` at every depth, links included."""
    values = dataset.get(STUDY_INSTANCE_UID)
    if values:
        into.studies.update(values)
    values = dataset.get(SERIES_INSTANCE_UID)
    if values:
        into.series.update(values)
    values = dataset.get(RETRIEVE_URL)
    if values:
        for url in values:
            into.add_link(url)

    def keep(url: str) -> str:
        into.add_link(url)
        return url

    dataset.map_links(keep)
    for tag in dataset.uid_tags():
        if tag not in _OWN_TAGS:
            values = dataset.get(tag)
            if values:
                into.others.update(v for v in values if not v.startswith(_STANDARD_ROOT))
    for tag, items in dataset.sequences():
        for item in items:
            if tag == REFERENCED_STUDY_SEQUENCE:
                values = item.get(REFERENCED_SOP_INSTANCE_UID)
                if values:
                    into.studies.update(values)
            collect_uids(item, into)


def apply_translation(
    dataset: DatasetView, translation: Translation, *, study_known: bool = False
) -> bool:
    """Rewrite ``dataset`` in place to public UIDs; False when it must be dropped whole.

    ``study_known`` says whether the enclosing context (the study of the route, or of the
    enclosing dataset) is known; a dataset's own (0020,000D) overrides it. A dataset is to be
    dropped when its own study or series is unknown (and not exposed): callers drop top-level
    ones and keep nested ones, whose references are then empty.
    """
    keep = True
    studies = dataset.get(STUDY_INSTANCE_UID)
    name = translation.patients.get(studies[0]) if studies else None
    if name is not None:
        for tag in (PATIENT_NAME, PATIENT_ID):
            if dataset.get(tag) is not None:
                dataset.put(tag, [name])
    if studies is not None:
        public = [translation.study(uid) for uid in studies]
        if studies and all(p is not None for p in public):
            dataset.put(STUDY_INSTANCE_UID, [p for p in public if p is not None])
            study_known = True
        else:
            dataset.put(STUDY_INSTANCE_UID, None)
            study_known = keep = False
    series = dataset.get(SERIES_INSTANCE_UID)
    if series is not None:
        mapped = [translation.series_uid(uid, study_known=study_known) for uid in series]
        if series and all(p is not None for p in mapped):
            dataset.put(SERIES_INSTANCE_UID, [p for p in mapped if p is not None])
        else:
            dataset.put(SERIES_INSTANCE_UID, None)
            keep = False
    urls = dataset.get(RETRIEVE_URL)
    if urls is not None:
        links = [translation.link(url, study_known=study_known) for url in urls]
        dataset.put(RETRIEVE_URL, [u for u in links if u is not None] or None)
    dataset.map_links(lambda url: translation.link(url, study_known=study_known))
    for tag in dataset.uid_tags():
        if tag in _OWN_TAGS:
            continue
        values = dataset.get(tag)
        if not values:
            continue
        others = [translation.other_uid(uid, study_known=study_known) for uid in values]
        if others != values:
            shown = [uid for uid in others if uid is not None]
            dataset.put(tag, shown if len(shown) == len(values) else None)
    for tag, items in dataset.sequences():
        for item in items:
            if tag == REFERENCED_STUDY_SEQUENCE:
                refs = item.get(REFERENCED_SOP_INSTANCE_UID)
                if refs is not None:
                    public = [translation.study(uid) for uid in refs]
                    known = [p for p in public if p is not None]
                    ok = bool(refs) and len(known) == len(refs)
                    item.put(REFERENCED_SOP_INSTANCE_UID, known if ok else None)
            apply_translation(item, translation, study_known=study_known)
    return keep


def copies_of(dataset: DatasetView, translation: Translation) -> list[Translation]:
    """The translations of the other examinations a study-level search row stands for
    (copies), each to be applied to a pristine clone of the row; a row of a series or an
    instance stays one row (a copy holds only some series)."""
    if not translation.copies or dataset.get(SERIES_INSTANCE_UID) is not None:
        return []
    studies = dataset.get(STUDY_INSTANCE_UID) or []
    if len(studies) != 1:
        return []
    study = studies[0]
    return [
        translation.for_copy(study, public, name)
        for public, name in translation.copies.get(study, ())
    ]


#: A UID quoted in free text (a Warning, an upstream's error message): three or more
#: dot-separated numbers.
UID_IN_TEXT = re.compile(r"\b[0-9]+(?:\.[0-9]+){2,}\b")
