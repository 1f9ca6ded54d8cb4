"""The DICOM attributes the proxy reads or writes (PS3.6), each spelled once, as an integer.

DICOM JSON (PS3.18 §F.2) names them by :func:`json_key`; DICOM XML (PS3.19) by the same
eight hexadecimal digits in its ``tag`` attribute; Part 10 by the integer itself.
"""

from __future__ import annotations

from typing import Final

PATIENT_NAME: Final = 0x00100010
PATIENT_ID: Final = 0x00100020
SOP_CLASS_UID: Final = 0x00080016
SOP_INSTANCE_UID: Final = 0x00080018
STUDY_DATE: Final = 0x00080020
STUDY_TIME: Final = 0x00080030
REFERENCED_STUDY_SEQUENCE: Final = 0x00081110
REFERENCED_SOP_CLASS_UID: Final = 0x00081150
REFERENCED_SOP_INSTANCE_UID: Final = 0x00081155
RETRIEVE_URL: Final = 0x00081190
FAILURE_REASON: Final = 0x00081197
FAILED_SOP_SEQUENCE: Final = 0x00081198
REFERENCED_SOP_SEQUENCE: Final = 0x00081199
STUDY_INSTANCE_UID: Final = 0x0020000D
SERIES_INSTANCE_UID: Final = 0x0020000E
SERIES_NUMBER: Final = 0x00200011


def json_key(tag: int) -> str:
    """The name of ``tag`` in DICOM JSON and in QIDO ``includefield``: ``0020000D``."""
    return f"{tag:08X}"
