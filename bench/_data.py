"""Bench data: the project's samples plus one series big enough to measure streamed throughput."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from shanoir_dicomweb_proxy.testing import SampleSet, generate_samples

__all__ = ["BenchData", "BenchSeries", "prepare"]

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
_SEED = "shanoir-dicomweb-proxy-bench-1"  # part of every UID: bump when the content changes


@dataclass(frozen=True)
class BenchSeries:
    study_uid: str
    series_uid: str
    instance_uids: tuple[str, ...]
    files: tuple[Path, ...]
    rows: int
    columns: int

    @property
    def bytes_on_disk(self) -> int:
        return sum(path.stat().st_size for path in self.files)


@dataclass(frozen=True)
class BenchData:
    samples: SampleSet
    series: BenchSeries

    @property
    def files(self) -> tuple[Path, ...]:
        return (*self.samples.files, *self.series.files)


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=[_SEED, *map(str, parts)]))


def _write_instance(path: Path, study_uid: str, series_uid: str, sop_uid: str, index: int) -> None:
    size = 512
    digest = hashlib.sha256(f"{_SEED}|{index}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE, sop_uid
    ds.PatientID, ds.PatientName = "BENCH00001", "BENCH^SERIES"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate = ds.SeriesDate = "20240101"
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.AccessionNumber, ds.StudyID = "BENCH1", "BENCH"
    ds.StudyDescription, ds.SeriesDescription = "BENCH", "BENCH 40x512x512"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, index + 1
    ds.FrameOfReferenceUID = _uid("frame-of-reference")
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-128, -128, index * 2]
    ds.SliceThickness, ds.PixelSpacing = 2, [0.5, 0.5]
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    # Noise does not compress: an accidental gzip anywhere would show in the figures.
    pixels = rng.integers(0, 4096, size=(size, size), dtype=np.uint16)
    ds.PixelData = pixels.astype("<u2", copy=False).tobytes()
    ds["PixelData"].VR = "OW"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MR_IMAGE, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    dcmwrite(tmp, ds, enforce_file_format=True)
    tmp.replace(path)


def bench_series(directory: Path, count: int = 40) -> BenchSeries:
    """``count`` single-frame 512x512 16-bit MR instances (~0.5 MB each), reused if present."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = _uid("study"), _uid("series")
    uids, files = [], []
    for index in range(count):
        sop_uid = _uid("instance", index)
        path = directory / f"{sop_uid}.dcm"
        if not path.exists():
            _write_instance(path, study_uid, series_uid, sop_uid, index)
        uids.append(sop_uid)
        files.append(path)
    return BenchSeries(study_uid, series_uid, tuple(uids), tuple(files), 512, 512)


def prepare(cache: Path) -> BenchData:
    """Write (or reuse) everything the bench loads into Orthanc."""
    return BenchData(generate_samples(cache / "samples"), bench_series(cache / "series"))
