"""The parsed DICOMweb request: what routing makes of a path, and what every layer below reads.

A :class:`DicomWebRequest` is a value: a layer that must change it (access narrowing a search,
the rewrite layer addressing the upstream's UIDs) puts a new one in the scope
(:func:`~shanoir_dicomweb_proxy._scope.set_dicomweb_request`). The upstream path is rebuilt
from it, never copied from the client.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from urllib.parse import quote

from ._dicom import SERIES_INSTANCE_UID, STUDY_INSTANCE_UID, json_key

__all__ = [
    "DicomWebRequest",
    "Level",
    "Resource",
    "Service",
    "is_series_key",
    "is_study_key",
    "split_uid_list",
]


class Service(enum.StrEnum):
    QIDO = "qido"
    WADO = "wado"
    STOW = "stow"
    #: WADO-URI (PS3.18 §9), served as the WADO-RS resource it names.
    WADO_URI = "wado-uri"


class Resource(enum.StrEnum):
    SEARCH = "search"
    RETRIEVE = "retrieve"
    METADATA = "metadata"
    FRAMES = "frames"
    RENDERED = "rendered"
    THUMBNAIL = "thumbnail"
    BULKDATA = "bulkdata"
    STORE = "store"


class Level(enum.StrEnum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"

    @property
    def segment(self) -> str:
        """The path segment that searches this level: ``studies``, ``series``, ``instances``."""
        return _SEGMENTS[self]

    @property
    def depth(self) -> int:
        """0 for studies, 1 for series, 2 for instances."""
        return _DEPTHS[self]


_SEGMENTS = {Level.STUDY: "studies", Level.SERIES: "series", Level.INSTANCE: "instances"}
_DEPTHS = {Level.STUDY: 0, Level.SERIES: 1, Level.INSTANCE: 2}


@dataclass(frozen=True, slots=True)
class DicomWebRequest:
    """One parsed DICOMweb request, the object the layers of the stack speak through.

    For a search, ``level`` is the level searched for and the UIDs are the scope of the search
    (``/studies/{study}/series`` has level SERIES and ``study`` set). For every other request
    the UIDs name the resource addressed. ``query`` holds the decoded query parameters in order.
    """

    method: str
    service: Service
    resource: Resource
    level: Level
    study: str | None = None
    series: str | None = None
    instance: str | None = None
    frames: tuple[int, ...] = ()
    bulk_path: tuple[str, ...] = ()
    query: tuple[tuple[str, str], ...] = ()

    @property
    def route(self) -> str:
        """A short route kind for logs and metrics, such as ``wado.frames.instance``."""
        return f"{self.service}.{self.resource}.{self.level}"

    def path(self) -> str:
        """The path of this request relative to a DICOMweb root, with a leading slash."""
        if self.resource is Resource.STORE:
            return "/studies" if self.study is None else f"/studies/{self.study}"
        parts: list[str] = []
        if self.study is not None:
            parts += ["studies", self.study]
        if self.series is not None:
            parts += ["series", self.series]
        if self.instance is not None:
            parts += ["instances", self.instance]
        if self.resource is Resource.SEARCH:
            parts.append(self.level.segment)
        elif self.resource is Resource.BULKDATA:
            parts += self.bulk_path
        else:
            if self.frames:
                parts += ["frames", ",".join(map(str, self.frames))]
            if self.resource in _SUFFIX_RESOURCES:
                parts.append(str(self.resource))
        return "/" + "/".join(parts)

    def query_string(self) -> str:
        """The query for the upstream.

        Values are percent-encoded except for ``* , ^ ? : / ;``: DICOM wildcards (PS3.18
        §8.3.4.6), comma lists (§8.3.4.1, ``includefield``, ``viewport``), PN component
        separators, and media types in ``accept=``. Orthanc does not percent-decode query
        strings, so the only way to make ``PatientName=Doe^J*`` match there is to send those
        characters literally, which RFC 3986 allows.
        """
        return "&".join(f"{key}={quote(value, safe=_QUERY_SAFE)}" for key, value in self.query)


_QUERY_SAFE = "*,^?:/;"
_SUFFIX_RESOURCES = frozenset({Resource.METADATA, Resource.RENDERED, Resource.THUMBNAIL})

_STUDY_KEYS = frozenset({"studyinstanceuid", json_key(STUDY_INSTANCE_UID).lower()})
_SERIES_KEYS = frozenset({"seriesinstanceuid", json_key(SERIES_INSTANCE_UID).lower()})
_UID_LIST = re.compile(r"[,\\]")


def is_study_key(key: str) -> bool:
    """Whether a query key matches on Study Instance UID (by keyword or tag, maybe nested)."""
    return key.rpartition(".")[2].lower() in _STUDY_KEYS


def is_series_key(key: str) -> bool:
    """Whether a query key matches on Series Instance UID (by keyword or tag, maybe nested)."""
    return key.rpartition(".")[2].lower() in _SERIES_KEYS


def split_uid_list(value: str) -> list[str]:
    """The UIDs of a UID list match value (comma or backslash separated)."""
    return [v for v in _UID_LIST.split(value) if v]
