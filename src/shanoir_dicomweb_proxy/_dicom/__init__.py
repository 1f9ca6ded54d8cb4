"""DICOM as the proxy meets it: the tags it reads, the rules of identifier translation over any
representation, and the codecs that apply them as streams (DICOM JSON, DICOM XML, Part 10,
``multipart/related``).

Nothing here knows HTTP or ASGI: bodies in, bodies out.
"""

from ._json import JsonDataset, JsonRewriter, json_value
from ._multipart import (
    BodyRewriter,
    BufferedPart,
    Chunk,
    MultipartRewriter,
    PartHeaders,
    PartRewriter,
    PassPart,
    WholeBody,
    split_parts,
)
from ._part10 import Part10Rewriter
from ._tags import (
    FAILED_SOP_SEQUENCE,
    FAILURE_REASON,
    REFERENCED_SOP_CLASS_UID,
    REFERENCED_SOP_INSTANCE_UID,
    REFERENCED_SOP_SEQUENCE,
    REFERENCED_STUDY_SEQUENCE,
    RETRIEVE_URL,
    SERIES_INSTANCE_UID,
    SERIES_NUMBER,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    STUDY_DATE,
    STUDY_INSTANCE_UID,
    STUDY_TIME,
    json_key,
)
from ._uids import (
    TRANSLATED_TAGS,
    UID_IN_TEXT,
    DatasetView,
    Resolve,
    Translation,
    UidCollector,
    apply_translation,
    collect_uids,
)
from ._xml import XmlDataset, to_xml, translate_xml, xml_value

__all__ = [
    "FAILED_SOP_SEQUENCE",
    "FAILURE_REASON",
    "REFERENCED_SOP_CLASS_UID",
    "REFERENCED_SOP_INSTANCE_UID",
    "REFERENCED_SOP_SEQUENCE",
    "REFERENCED_STUDY_SEQUENCE",
    "RETRIEVE_URL",
    "SERIES_INSTANCE_UID",
    "SERIES_NUMBER",
    "SOP_CLASS_UID",
    "SOP_INSTANCE_UID",
    "STUDY_DATE",
    "STUDY_INSTANCE_UID",
    "STUDY_TIME",
    "TRANSLATED_TAGS",
    "UID_IN_TEXT",
    "BodyRewriter",
    "BufferedPart",
    "Chunk",
    "DatasetView",
    "JsonDataset",
    "JsonRewriter",
    "MultipartRewriter",
    "Part10Rewriter",
    "PartHeaders",
    "PartRewriter",
    "PassPart",
    "Resolve",
    "Translation",
    "UidCollector",
    "WholeBody",
    "XmlDataset",
    "apply_translation",
    "collect_uids",
    "json_key",
    "json_value",
    "split_parts",
    "to_xml",
    "translate_xml",
    "xml_value",
]
