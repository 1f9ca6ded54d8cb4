"""The Native DICOM Model (PS3.19 §A.1): DICOM XML, one dataset per multipart part."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from typing import Any

from .._errors import UpstreamError
from ._uids import (
    DatasetView,
    Resolve,
    UidCollector,
    apply_translation,
    collect_uids,
    copies_of,
)

__all__ = ["XmlDataset", "to_xml", "translate_xml", "xml_value"]

NATIVE_NAMESPACE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"

# Written back as the default namespace (ElementTree would otherwise invent an "ns0" prefix).
ET.register_namespace("", NATIVE_NAMESPACE)


_PN_PARTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


class XmlDataset:
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
        for child in [v for v in attribute if _local(v.tag) in ("Value", "PersonName")]:
            attribute.remove(child)
        for number, text in enumerate(values or (), start=1):
            if attribute.get("vr") != "PN":
                value = ET.SubElement(attribute, namespace + "Value", number=str(number))
                value.text = text
                continue
            # PS3.19 A.1.5: a person name's components, in its alphabetic form.
            name = ET.SubElement(attribute, namespace + "PersonName", number=str(number))
            alphabetic = ET.SubElement(name, namespace + "Alphabetic")
            for part, component in zip(_PN_PARTS, text.split("^"), strict=False):
                if component:
                    ET.SubElement(alphabetic, namespace + part).text = component

    def sequences(self) -> Iterable[tuple[int, Iterable[DatasetView]]]:
        for child in self._element:
            if _local(child.tag) == "DicomAttribute" and child.get("vr") == "SQ":
                items = [XmlDataset(i) for i in child if _local(i.tag) == "Item"]
                yield int(child.get("tag", "0"), 16), items

    def uid_tags(self) -> Iterable[int]:
        for child in self._element:
            if _local(child.tag) == "DicomAttribute" and child.get("vr") == "UI":
                yield int(child.get("tag", "0"), 16)

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


async def translate_xml(body: bytes, resolve: Resolve, *, study_known: bool) -> list[bytes]:
    """Translate one DICOM XML dataset: the datasets to show in its place, none when it must
    be left out, several when a study-level search row stands for copies (one each)."""
    root = _parse(body)
    view = XmlDataset(root)
    collector = UidCollector()
    collect_uids(view, collector)
    if not collector:
        return [_written(root)]
    translation = await resolve(collector)
    copies = copies_of(view, translation)
    out: list[bytes] = []
    if apply_translation(view, translation, study_known=study_known):
        out.append(_written(root))
    for copy in copies:
        clone = _parse(body)
        if apply_translation(XmlDataset(clone), copy, study_known=study_known):
            out.append(_written(clone))
    return out


def _parse(body: bytes) -> ET.Element:
    try:
        return ET.fromstring(body)  # noqa: S314 (from the upstream PACS; expat refuses entity bombs)
    except ET.ParseError as exc:
        raise UpstreamError("the upstream sent malformed DICOM XML") from exc


def _written(root: ET.Element) -> bytes:
    written: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return written


def xml_value(body: bytes, tag: int) -> str | None:
    """The first value of ``tag`` at the top level of one DICOM XML dataset, or None."""
    values = XmlDataset(_parse(body)).get(tag)
    return values[0] if values else None


def to_xml(dataset: dict[str, Any]) -> bytes:
    """A small DICOM JSON object (strings, numbers, sequences; no bulk data) as DICOM XML."""
    root = ET.Element(f"{{{NATIVE_NAMESPACE}}}NativeDicomModel")

    def fill(element: ET.Element, data: dict[str, Any]) -> None:
        for tag, attribute in data.items():
            attributes = {"tag": tag, "vr": attribute["vr"]}
            node = ET.SubElement(element, f"{{{NATIVE_NAMESPACE}}}DicomAttribute", attributes)
            for number, value in enumerate(attribute.get("Value", []), start=1):
                if attribute["vr"] == "SQ":
                    item = ET.SubElement(node, f"{{{NATIVE_NAMESPACE}}}Item", number=str(number))
                    fill(item, value)
                else:
                    child = ET.SubElement(node, f"{{{NATIVE_NAMESPACE}}}Value", number=str(number))
                    child.text = str(value)

    fill(root, dataset)
    return _written(root)
