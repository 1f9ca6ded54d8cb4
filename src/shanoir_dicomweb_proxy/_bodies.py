"""Identifier translation in DICOM JSON and DICOM XML bodies, as streams (DESIGN §3).

A JSON array (search results, metadata) is cut into its top-level objects as the bytes arrive
and each batch of complete objects is parsed with orjson, translated with one lookup, and
written out again: memory holds one chunk and one object, whatever the size of the study.
Objects are found without a character loop in Python: orjson parses from the start of an
object and reports where the document ends ("unexpected content after document"), and a
second parse of exactly that slice confirms it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson

from ._errors import UpstreamError
from ._translate import (
    DatasetView,
    Translation,
    UidCollector,
    apply_translation,
    collect_uids,
)

__all__ = ["JsonRewriter", "Resolve", "translate_xml"]

Resolve = Callable[[UidCollector], Awaitable[Translation]]

_WHITESPACE = b" \t\r\n"
_NO_TRANSLATION = Translation(studies={}, series={})


class _JsonDataset:
    """A DICOM JSON object (PS3.18 Annex F) as a :class:`DatasetView`."""

    __slots__ = ("_data", "_sequences", "_bulk")

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data
        sequences: list[tuple[int, list[_JsonDataset]]] = []
        bulk: list[dict[str, Any]] = []
        for key, element in data.items():
            if type(element) is not dict:
                continue
            if element.get("vr") == "SQ":
                items = element.get("Value")
                if items:
                    views = [_JsonDataset(i) for i in items if type(i) is dict]
                    sequences.append((int(key, 16), views))
            elif "BulkDataURI" in element:
                bulk.append(element)
        self._sequences = sequences
        self._bulk = bulk

    def get(self, tag: int) -> list[str] | None:
        element = self._data.get(f"{tag:08X}")
        if type(element) is not dict:
            return None
        values = element.get("Value")
        if not isinstance(values, list):
            return []
        return [v for v in values if type(v) is str]

    def put(self, tag: int, values: list[str] | None) -> None:
        element = self._data[f"{tag:08X}"]
        if values is None:
            element.pop("Value", None)
        else:
            element["Value"] = values

    def sequences(self) -> Iterable[tuple[int, Iterable[DatasetView]]]:
        return self._sequences

    def map_links(self, rewrite: Callable[[str], str | None]) -> None:
        for element in self._bulk:
            uri = element["BulkDataURI"]
            new = rewrite(uri) if type(uri) is str else None
            if new is None:
                del element["BulkDataURI"]
            else:
                element["BulkDataURI"] = new


class JsonRewriter:
    """Translate a DICOM JSON body: an array of datasets as a stream, or one object whole.

    Top-level datasets of unknown studies (or hidden series) are left out of the array.
    ``study_known`` says whether the route's own study is known (rows without (0020,000D)
    then belong to it). An object larger than ``max_object`` bytes is an error.
    """

    def __init__(
        self, resolve: Resolve, *, study_known: bool, max_object: int = 256 * 1024 * 1024
    ) -> None:
        self._resolve = resolve
        self._study_known = study_known
        self._max = max_object
        self._buffer = bytearray()
        self._pos = 0  # where the next object (or separator) starts in the buffer
        self._retry_at = 0  # the buffer size at which an incomplete object is worth a new try
        self._array: bool | None = None  # None until the first byte tells
        self._first = True
        self._done = False

    async def feed(self, chunk: bytes) -> bytes:
        self._buffer += chunk
        if self._array is None:
            start = _skip_space(self._buffer, 0)
            if start == len(self._buffer):
                return b""
            self._array = self._buffer[start] == ord("[")
            self._pos = start + 1 if self._array else start
            if self._array:
                head = b"["
                return head + await self._objects()
        if not self._array:
            if len(self._buffer) > self._max:
                raise UpstreamError(f"a DICOM JSON object exceeds {self._max} bytes")
            return b""
        return await self._objects()

    async def close(self) -> bytes:
        if self._array is None:
            return b""
        if not self._array:
            try:
                value = orjson.loads(self._buffer)
            except orjson.JSONDecodeError as exc:
                raise UpstreamError("the upstream sent malformed DICOM JSON") from exc
            self._buffer = bytearray()
            if type(value) is dict:
                view = _JsonDataset(value)
                translation = await self._translate([view])
                apply_translation(view, translation, study_known=self._study_known)
            return orjson.dumps(value)
        out = await self._objects()
        if not self._done or _skip_space(self._buffer, self._pos) != len(self._buffer):
            raise UpstreamError("the upstream's DICOM JSON answer ended early")
        return out

    async def _objects(self) -> bytes:
        """Translate every complete object in the buffer; keep the incomplete rest."""
        if self._done or len(self._buffer) < self._retry_at:
            return b""
        objects: list[dict[str, Any]] = []
        buffer = self._buffer
        view = memoryview(buffer)
        pos = self._pos
        try:
            while True:
                pos = _skip_space(buffer, pos)
                if pos == len(buffer):
                    break
                byte = buffer[pos]
                if byte == ord(","):
                    pos += 1
                    continue
                if byte == ord("]"):
                    self._done = True
                    pos += 1
                    break
                end = _object_end(view, pos)
                if end is None:
                    break
                value = orjson.loads(view[pos:end])
                if type(value) is not dict:
                    raise UpstreamError("the upstream's DICOM JSON array holds a non-object")
                objects.append(value)
                pos = end
        finally:
            view.release()
        del buffer[:pos]
        self._pos = 0
        rest = len(buffer)
        if rest > self._max:
            raise UpstreamError(f"a DICOM JSON object exceeds {self._max} bytes")
        # An incomplete object is tried again once the buffer has doubled: linear, not
        # quadratic, in the size of a large object arriving in small chunks.
        self._retry_at = 2 * rest if rest > 65536 else 0
        out = await self._translate_rows(objects)
        return out + (b"]" if self._done else b"")

    async def _translate(self, views: list[_JsonDataset]) -> Translation:
        collector = UidCollector()
        for view in views:
            collect_uids(view, collector)
        if not collector.studies and not collector.series:
            return _NO_TRANSLATION
        return await self._resolve(collector)

    async def _translate_rows(self, objects: list[dict[str, Any]]) -> bytes:
        if not objects:
            return b""
        views = [_JsonDataset(o) for o in objects]
        translation = await self._translate(views)
        out: list[bytes] = []
        for value, view in zip(objects, views, strict=True):
            if apply_translation(view, translation, study_known=self._study_known):
                out.append(orjson.dumps(value))
        if not out:
            return b""
        body = b",".join(out)
        if self._first:
            self._first = False
            return body
        return b"," + body


def _skip_space(buffer: bytearray, pos: int) -> int:
    size = len(buffer)
    while pos < size and buffer[pos] in _WHITESPACE:
        pos += 1
    return pos


def _object_end(view: memoryview, start: int) -> int | None:
    """Where the JSON value starting at ``start`` ends, or None when it is not complete yet."""
    try:
        orjson.loads(view[start:])
    except orjson.JSONDecodeError as exc:
        end = start + exc.pos
        while end > start and view[end - 1] in _WHITESPACE:
            end -= 1
        if end > start:
            try:
                orjson.loads(view[start:end])
            except orjson.JSONDecodeError:
                return None  # cut in the middle, or malformed (close() tells which)
            return end
        return None
    return len(view)


# DICOM XML (PS3.19 Native DICOM Model), one dataset per multipart part. Its namespace is
# written back as the default one (ElementTree would otherwise invent an "ns0" prefix).
ET.register_namespace("", "http://dicom.nema.org/PS3.19/models/NativeDICOM")


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


class _XmlDataset:
    """A ``NativeDicomModel`` or ``Item`` element as a :class:`DatasetView`."""

    __slots__ = ("_element",)

    def __init__(self, element: ET.Element) -> None:
        self._element = element

    def _attribute(self, tag: int) -> ET.Element | None:
        wanted = f"{tag:08X}"
        for child in self._element:
            if _local(child.tag) == "DicomAttribute" and child.get("tag", "").upper() == wanted:
                return child
        return None

    def get(self, tag: int) -> list[str] | None:
        attribute = self._attribute(tag)
        if attribute is None:
            return None
        return [v.text or "" for v in attribute if _local(v.tag) == "Value"]

    def put(self, tag: int, values: list[str] | None) -> None:
        attribute = self._attribute(tag)
        assert attribute is not None
        namespace = attribute.tag[: -len("DicomAttribute")]
        for child in [v for v in attribute if _local(v.tag) == "Value"]:
            attribute.remove(child)
        for number, text in enumerate(values or (), start=1):
            value = ET.SubElement(attribute, namespace + "Value", number=str(number))
            value.text = text

    def sequences(self) -> Iterable[tuple[int, Iterable[DatasetView]]]:
        for child in self._element:
            if _local(child.tag) == "DicomAttribute" and child.get("vr") == "SQ":
                items = [_XmlDataset(i) for i in child if _local(i.tag) == "Item"]
                yield int(child.get("tag", "0"), 16), items

    def map_links(self, rewrite: Callable[[str], str | None]) -> None:
        for child in self._element:
            if _local(child.tag) != "DicomAttribute":
                continue
            for bulk in [b for b in child if _local(b.tag) == "BulkData"]:
                # PS3.19 says "uri"; Orthanc writes "URI".
                for name, uri in list(bulk.attrib.items()):
                    if name.lower() != "uri":
                        continue
                    new = rewrite(uri)
                    if new is None:
                        child.remove(bulk)
                    else:
                        bulk.set(name, new)


async def translate_xml(body: bytes, resolve: Resolve, *, study_known: bool) -> bytes | None:
    """Translate one DICOM XML dataset; None when it must be left out."""
    try:
        root = ET.fromstring(body)  # noqa: S314 (from the upstream PACS; expat refuses entity bombs)
    except ET.ParseError as exc:
        raise UpstreamError("the upstream sent malformed DICOM XML") from exc
    view = _XmlDataset(root)
    collector = UidCollector()
    collect_uids(view, collector)
    if collector.studies or collector.series:
        translation = await resolve(collector)
        if not apply_translation(view, translation, study_known=study_known):
            return None
    written: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return written
