"""A second archive for the translation and access tests: the session's small samples plus a
SEG whose nested references point at another series, pydicom's SR test file and an instance
stored deflated (:func:`extra_files`); the fixtures that serve it are in ``conftest.py``."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from shanoir_dicomweb_proxy.testing import SampleSet

STUDY_ROOT = "1.4.9.12.34.1.8527"
SERIES_ROOT = "1.4.9.12.34.2.8527"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SEG_SERIES = "1.2.826.0.1.3680043.8.498.4242.2"


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return Path(path)


def _seg(samples: SampleSet, folder: Path) -> Path:
    """A SEG in the KOS study that refers to one of its MR series at three depths, and to
    its own study through a Referenced Study Sequence. Other UI attributes hold real UIDs too:
    its Frame of Reference UID is its study's (as in pydicom's MR test series), and the MR
    series UID is a Dimension Organization UID (depth 1) and a Referenced SOP Instance UID of
    a Source Image Sequence (depth 3)."""
    study = samples.small_studies[0]
    source = study.series[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(SEG_CLASS)
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.8.498.4242.3")
    ds.SOPClassUID = SEG_CLASS
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.4242.2"
    ds.Modality = "SEG"
    ds.PatientID = study.patient_id
    ds.PatientName = study.patient_name
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ref.ReferencedSOPInstanceUID = source.instances[0]
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = source.uid
    series_ref.ReferencedInstanceSequence = Sequence([ref])
    ds.ReferencedSeriesSequence = Sequence([series_ref])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study_ref.ReferencedSOPInstanceUID = study.uid
    ds.ReferencedStudySequence = Sequence([study_ref])
    odd_ref = Dataset()
    odd_ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    odd_ref.ReferencedSOPInstanceUID = source.uid
    derivation = Dataset()
    derivation.SourceImageSequence = Sequence([ref, odd_ref])
    frame = Dataset()
    frame.DerivationImageSequence = Sequence([derivation])
    evidence = Dataset()
    evidence.StudyInstanceUID = study.uid
    evidence.ReferencedSeriesSequence = Sequence([series_ref])
    ds.PerFrameFunctionalGroupsSequence = Sequence([frame])
    ds.FrameOfReferenceUID = study.uid
    dimension = Dataset()
    dimension.DimensionOrganizationUID = source.uid
    ds.DimensionOrganizationSequence = Sequence([dimension])
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = 1
    ds.PixelData = b"\xff" * 8
    path = folder / "seg.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _deflated(folder: Path) -> Path:
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.4343.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.4343.2"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(
        "1.2.826.0.1.3680043.8.498.4343.3"
    )
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = folder / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


DEFLATED_STUDY = "1.2.826.0.1.3680043.8.498.4343.1"
DEFLATED_INSTANCE = "1.2.826.0.1.3680043.8.498.4343.3"


def extra_files(samples: SampleSet, folder: Path) -> list[Path]:
    """The archive's files besides the session's small samples, written into ``folder``."""
    return [_seg(samples, folder), _testdata("test-SR.dcm"), _deflated(folder)]
