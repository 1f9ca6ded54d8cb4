"""Deterministic DICOM sample data: small MR/CT studies, one large multi-frame, a KOS and an SR."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

__all__ = ["SampleInstance", "SampleSeries", "SampleSet", "SampleStudy", "generate_samples"]

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

_PATIENTS = (  # PatientID, PatientName, PatientBirthDate, PatientSex
    ("HARN00001", "HARNOIS^ALICE", "19620314", "F"),
    ("HARN00002", "MARTIN^BERNARD^J", "19750822", "M"),
    ("HARN00003", "DUPONT^CLAIRE", "19881105", "F"),
    ("HARN00004", "LEROY^DAVID", "19930130", "M"),
)
_LARGE_PATIENT = ("HARN00005", "PHANTOM^LARGE", "20000101", "O")
_STUDY_DESCRIPTIONS = {"MR": ("BRAIN MRI", "SPINE MRI"), "CT": ("CT HEAD", "CT CHEST")}
_SERIES_DESCRIPTIONS = {"MR": ("T1 MPRAGE", "T2 FLAIR"), "CT": ("AXIAL 5MM", "CORONAL 3MM")}
_STUDY_COUNT, _IMAGES_PER_SERIES, _SMALL = 12, 3, 64
_KOS_STUDY = 0  # the study that also gets a KOS and an SR
_IMPLICIT_SERIES = (1, 1)  # (study, series) written in implicit VR little endian
_Ref = tuple[str, str, str]  # (series UID, SOP class UID, SOP instance UID)
_FIRST_DATE = dt.date(2019, 3, 4)
# Part of every UID: bump it when the generated content changes, so that cached files from an
# older layout are not reused.
_LAYOUT_VERSION = "1"


@dataclass(frozen=True)
class SampleInstance:
    """One stored instance, with its pixel geometry (``frames == 0`` when it has no pixels)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    path: Path
    frames: int = 0
    rows: int = 0
    columns: int = 0

    @property
    def frame_bytes(self) -> int:
        """Size of one native 16-bit frame."""
        return self.rows * self.columns * 2

    @property
    def pixel_bytes(self) -> int:
        """Size of the whole native PixelData value."""
        return self.frames * self.frame_bytes

    def frame(self, number: int) -> bytes:
        """The native bytes of frame ``number`` (1-based), read from the file.

        PixelData is the last element of every generated file, so frames sit at its end.
        """
        if not 1 <= number <= self.frames:
            raise ValueError(f"frame {number} out of 1..{self.frames}")
        with self.path.open("rb") as file:
            file.seek(-self.pixel_bytes + (number - 1) * self.frame_bytes, os.SEEK_END)
            return file.read(self.frame_bytes)


@dataclass(frozen=True)
class SampleSeries:
    uid: str
    modality: str
    description: str
    transfer_syntax: str
    instances: tuple[str, ...]  # SOP instance UIDs


@dataclass(frozen=True)
class SampleStudy:
    uid: str
    patient_id: str
    patient_name: str
    date: str  # StudyDate, YYYYMMDD
    accession_number: str
    description: str
    series: tuple[SampleSeries, ...]


@dataclass(frozen=True)
class SampleSet:
    """What :func:`generate_samples` wrote. ``studies[-1]`` is the ``LARGE`` study."""

    studies: tuple[SampleStudy, ...]
    large: SampleInstance
    kos: SampleInstance
    sr: SampleInstance
    files: tuple[Path, ...]

    @property
    def small_studies(self) -> tuple[SampleStudy, ...]:
        """The 12 studies of small images (all but ``LARGE``)."""
        return tuple(s for s in self.studies if s.uid != self.large.study_uid)

    def all_study_uids(self) -> list[str]:
        return [study.uid for study in self.studies]

    def all_series_uids(self) -> list[str]:
        return [series.uid for study in self.studies for series in study.series]

    def all_instance_uids(self) -> list[str]:
        return [
            uid for study in self.studies for series in study.series for uid in series.instances
        ]

    def study(self, uid: str) -> SampleStudy:
        return next(study for study in self.studies if study.uid == uid)


class _Writer:
    """Names files by SOP instance UID, and skips files that already exist."""

    def __init__(self, directory: Path, seed: str) -> None:
        self.directory, self.seed = directory, seed
        self.files: list[Path] = []

    def uid(self, *parts: object) -> str:
        return str(generate_uid(entropy_srcs=[self.seed, _LAYOUT_VERSION, *map(str, parts)]))

    def rng(self, *parts: object) -> np.random.Generator:
        digest = hashlib.sha256("|".join([self.seed, *map(str, parts)]).encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def path(self, sop_uid: str) -> Path:
        return self.directory / f"{sop_uid}.dcm"

    def needs(self, sop_uid: str) -> bool:
        """Record the file; tell whether it still has to be written."""
        path = self.path(sop_uid)
        self.files.append(path)
        return not path.exists()

    def write(self, ds: Dataset, transfer_syntax: UID = ExplicitVRLittleEndian) -> None:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = transfer_syntax
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        path = self.path(ds.SOPInstanceUID)
        # Write aside then rename: an interrupted or concurrent run never leaves a partial file.
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        dcmwrite(tmp, ds, enforce_file_format=True)
        tmp.replace(path)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _header(
    patient: tuple[str, str, str, str],
    study: dict[str, str],
    series_uid: str,
    series_number: int,
    modality: str,
    sop_class: str,
    sop_uid: str,
    instance_number: int,
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient
    ds.StudyInstanceUID = study["uid"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study["date"]
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study["time"]
    ds.AccessionNumber, ds.StudyID = study["accession"], study["id"]
    ds.StudyDescription = study["description"]
    ds.ReferringPhysicianName = "REFERRER^ROBERT"
    ds.Manufacturer, ds.InstitutionName = "shanoir-dicomweb-proxy", "TEST HOSPITAL"
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, series_uid, series_number
    ds.InstanceNumber = instance_number
    return ds


def _pixels_16bit(ds: Dataset, bits_stored: int) -> None:
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0


def _phantom(rng: np.random.Generator, frames: int, size: int) -> bytes:
    """Native pixels of slices through a bright sphere plus noise: looks like something when
    rendered, and does not compress much better than real data."""
    z = np.linspace(-1.0, 1.0, frames + 2)[1:-1] if frames > 1 else np.zeros(1)
    y, x = np.ogrid[-1.0 : 1.0 : size * 1j, -1.0 : 1.0 : size * 1j]
    inside = (x * x + y * y)[None, :, :] < (0.7 - z * z)[:, None, None]
    pixels: np.ndarray[Any, np.dtype[np.uint16]] = rng.integers(
        100, 500, size=(frames, size, size), dtype=np.uint16
    )
    pixels[inside] += 2500
    return pixels.astype("<u2", copy=False).tobytes()


def _image(
    header: Dataset, rng: np.random.Generator, slice_index: int, frame_of_ref: str
) -> Dataset:
    ds = header
    modality = ds.Modality
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_ref, ""
    ds.PatientPosition = "HFS"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-112, -112, slice_index * 5]
    ds.SliceLocation, ds.SliceThickness, ds.PixelSpacing = slice_index * 5, 5, [3.5, 3.5]
    ds.Rows = ds.Columns = _SMALL
    _pixels_16bit(ds, 12)
    if modality == "CT":
        ds.KVP, ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 120, -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
    else:
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", "SP", ""
        ds.MRAcquisitionType, ds.MagneticFieldStrength = "3D", 3
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 2300, 2.98, 1
        ds.WindowCenter, ds.WindowWidth = 1400, 2800
    ds.PixelData = _phantom(rng, 1, _SMALL)
    ds["PixelData"].VR = "OW"
    return ds


def _evidence(study_uid: str, refs: list[_Ref]) -> Sequence:
    """A CurrentRequestedProcedureEvidenceSequence for (series_uid, sop_class, sop_uid) refs."""
    series_items = []
    for series_uid in dict.fromkeys(series for series, _, _ in refs):
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedSOPSequence = [_sop_ref(c, u) for s, c, u in refs if s == series_uid]
        series_items.append(item)
    study = Dataset()
    study.StudyInstanceUID = study_uid
    study.ReferencedSeriesSequence = series_items
    return Sequence([study])


def _sop_ref(sop_class: str, sop_uid: str) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sop_class, sop_uid
    return ref


def _content(value_type: str, concept: Dataset | None = None, **values: Any) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", value_type
    if concept is not None:
        item.ConceptNameCodeSequence = [concept]
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _image_items(refs: list[_Ref]) -> list[Dataset]:
    return [_content("IMAGE", ReferencedSOPSequence=[_sop_ref(c, u)]) for _, c, u in refs]


def _sr_document(ds: Dataset, study_uid: str, refs: list[_Ref]) -> Dataset:
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(study_uid, refs)
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    return ds


def _kos(header: Dataset, refs: list[_Ref]) -> Dataset:
    ds = _sr_document(header, header.StudyInstanceUID, refs)
    ds.ConceptNameCodeSequence = [_code("113000", "DCM", "Of Interest")]
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = [template]
    description = _code("113012", "DCM", "Key Object Description")
    ds.ContentSequence = [
        *_image_items(refs),
        _content("TEXT", description, TextValue="Images selected for review"),
    ]
    return ds


def _text_sr(header: Dataset, refs: list[_Ref]) -> Dataset:
    ds = _sr_document(header, header.StudyInstanceUID, refs)
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = []
    ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic Imaging Report")]
    finding = _code("121071", "DCM", "Finding")
    ds.ContentSequence = [
        _content("TEXT", finding, TextValue="No abnormality detected in the test phantom."),
        *_image_items(refs),
    ]
    return ds


def _large(w: _Writer, frames: int) -> tuple[SampleStudy, SampleInstance]:
    study = {
        "uid": w.uid("large-study"),
        "date": "20240612",
        "time": "101500",
        "accession": "ACCLARGE",
        "id": "LARGE",
        "description": "LARGE",
    }
    series_uid, sop_uid = w.uid("large-series"), w.uid("large-instance", frames)
    description = f"MULTIFRAME {frames}"
    if w.needs(sop_uid):
        ds = _header(_LARGE_PATIENT, study, series_uid, 1, "OT", MULTIFRAME_WORD_SC, sop_uid, 1)
        ds.SeriesDescription = description
        ds.ConversionType, ds.ImageType = "WSD", ["DERIVED", "SECONDARY"]
        ds.NumberOfFrames, ds.FrameTime, ds.FrameIncrementPointer = frames, 40, 0x00181063
        ds.Rows = ds.Columns = 512
        _pixels_16bit(ds, 16)
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
        ds.WindowCenter, ds.WindowWidth = 1500, 3000
        ds.PixelData = _phantom(w.rng("large", frames), frames, 512)
        ds["PixelData"].VR = "OW"
        w.write(ds)
    series = SampleSeries(series_uid, "OT", description, str(ExplicitVRLittleEndian), (sop_uid,))
    sample = SampleStudy(
        study["uid"], *_LARGE_PATIENT[:2], study["date"], "ACCLARGE", "LARGE", (series,)
    )
    instance = SampleInstance(
        study["uid"], series_uid, sop_uid, MULTIFRAME_WORD_SC, w.path(sop_uid), frames, 512, 512
    )
    return sample, instance


def _documents(
    w: _Writer, patient: tuple[str, str, str, str], study: dict[str, str], refs: list[_Ref]
) -> list[tuple[SampleSeries, SampleInstance]]:
    """A KOS and a Basic Text SR referencing ``refs``, each in its own series: KO and SR are
    different modalities, and Modality is a series attribute."""
    out = []
    kinds = [
        ("KO", KEY_OBJECT_SELECTION, _kos, "KEY IMAGES"),
        ("SR", BASIC_TEXT_SR, _text_sr, "REPORT"),
    ]
    for number, (modality, sop_class, build, description) in enumerate(kinds, start=90):
        series_uid = w.uid("series", study["id"], number)
        sop_uid = w.uid("doc", study["id"], number)
        if w.needs(sop_uid):
            ds = _header(patient, study, series_uid, number, modality, sop_class, sop_uid, 1)
            ds.SeriesDescription = description
            w.write(build(ds, refs))
        syntax = str(ExplicitVRLittleEndian)
        series = SampleSeries(series_uid, modality, description, syntax, (sop_uid,))
        instance = SampleInstance(study["uid"], series_uid, sop_uid, sop_class, w.path(sop_uid))
        out.append((series, instance))
    return out


def _small_study(w: _Writer, index: int) -> tuple[SampleStudy, list[SampleInstance]]:
    patient = _PATIENTS[index % len(_PATIENTS)]
    modality = ("MR", "CT")[index % 2]
    study = {
        "uid": w.uid("study", index),
        "date": (_FIRST_DATE + dt.timedelta(days=53 * index)).strftime("%Y%m%d"),
        "time": f"{8 + index % 10:02d}{(7 * index) % 60:02d}00",
        "accession": f"ACC{index + 1:05d}",
        "id": str(index + 1),
        "description": _STUDY_DESCRIPTIONS[modality][index // 2 % 2],
    }
    sop_class = MR_IMAGE if modality == "MR" else CT_IMAGE
    frame_of_ref = w.uid("frame-of-reference", index)
    series: list[SampleSeries] = []
    refs: list[_Ref] = []
    for s, description in enumerate(_SERIES_DESCRIPTIONS[modality]):
        series_uid = w.uid("series", index, s)
        syntax = (
            ImplicitVRLittleEndian if (index, s) == _IMPLICIT_SERIES else ExplicitVRLittleEndian
        )
        sops = tuple(w.uid("image", index, s, i) for i in range(_IMAGES_PER_SERIES))
        for i, sop_uid in enumerate(sops):
            refs.append((series_uid, sop_class, sop_uid))
            if w.needs(sop_uid):
                ds = _header(patient, study, series_uid, s + 1, modality, sop_class, sop_uid, i + 1)
                ds.SeriesDescription = description
                w.write(_image(ds, w.rng("image", sop_uid), i, frame_of_ref), syntax)
        series.append(SampleSeries(series_uid, modality, description, str(syntax), sops))
    documents = _documents(w, patient, study, refs) if index == _KOS_STUDY else []
    series += [doc_series for doc_series, _ in documents]
    sample = SampleStudy(
        study["uid"],
        patient[0],
        patient[1],
        study["date"],
        study["accession"],
        study["description"],
        tuple(series),
    )
    return sample, [instance for _, instance in documents]


def generate_samples(
    directory: Path, *, large_frames: int = 110, seed: str = "shanoir"
) -> SampleSet:
    """Write the sample files into ``directory`` (created if needed) and describe them.

    UIDs and contents depend only on ``seed`` (and ``large_frames``), and files are named by
    SOP instance UID: files already present are reused, so a second call is nearly free.
    """
    if large_frames < 1:
        raise ValueError("large_frames must be at least 1")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    w = _Writer(directory, seed)
    studies: list[SampleStudy] = []
    documents: list[SampleInstance] = []
    for index in range(_STUDY_COUNT):
        study, docs = _small_study(w, index)
        studies.append(study)
        documents += docs
    large_study, large = _large(w, large_frames)
    kos, sr = documents
    return SampleSet((*studies, large_study), large, kos, sr, tuple(w.files))
