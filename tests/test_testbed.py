"""The real-PACS test bed itself: sample generation and the Orthanc upstream."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pydicom
import pytest

from shanoir_dicomweb_proxy.testing import (
    OrthancError,
    OrthancServer,
    SampleSet,
    generate_samples,
)

OCTET_FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def _studies(server: OrthancServer, **params: str) -> list[dict[str, object]]:
    response = httpx.get(f"{server.dicomweb_url}/studies", params=params)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/dicom+json")
    studies: list[dict[str, object]] = response.json()
    return studies


def _single_part(response: httpx.Response) -> tuple[bytes, bytes]:
    """(headers, body) of the only part of a multipart/related answer."""
    boundary = response.headers["content-type"].split("boundary=")[1].strip('"').encode()
    parts = response.content.split(b"--" + boundary)
    assert parts[0] == b"" and parts[-1].startswith(b"--"), "not a multipart body"
    assert len(parts) == 3, "expected exactly one part"
    headers, body = parts[1].split(b"\r\n\r\n", 1)
    assert body.endswith(b"\r\n")
    return headers, body[:-2]


def test_samples_shape(samples: SampleSet) -> None:
    assert len(samples.studies) == 13 and len(samples.small_studies) == 12
    assert len({s.patient_id for s in samples.small_studies}) == 4
    assert len(set(samples.all_study_uids())) == 13
    assert len(samples.files) == len(samples.all_instance_uids()) == 12 * 6 + 2 + 1
    assert all(path.exists() for path in samples.files)
    assert samples.large.frames == 110 and samples.large.pixel_bytes == 110 * 512 * 512 * 2
    assert samples.large.path.stat().st_size >= 50_000_000
    syntaxes = {s.transfer_syntax for study in samples.studies for s in study.series}
    assert syntaxes == {pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian}


def test_samples_are_deterministic_and_reused(samples: SampleSet, tmp_path: Path) -> None:
    directory = samples.files[0].parent
    mtimes = {path: path.stat().st_mtime_ns for path in samples.files}
    assert generate_samples(directory) == samples
    assert {path: path.stat().st_mtime_ns for path in samples.files} == mtimes
    other = generate_samples(tmp_path, large_frames=2, seed="other")
    assert not set(other.all_instance_uids()) & set(samples.all_instance_uids())


def test_documents_reference_the_images(samples: SampleSet) -> None:
    study = samples.study(samples.kos.study_uid)
    images = {series.uid: set(series.instances) for series in study.series[:2]}
    for document, modality in ((samples.kos, "KO"), (samples.sr, "SR")):
        ds = pydicom.dcmread(document.path)
        assert (ds.SOPClassUID, ds.Modality) == (document.sop_class_uid, modality)
        (evidence,) = ds.CurrentRequestedProcedureEvidenceSequence
        assert evidence.StudyInstanceUID == study.uid
        referenced = {
            item.SeriesInstanceUID: {
                ref.ReferencedSOPInstanceUID for ref in item.ReferencedSOPSequence
            }
            for item in evidence.ReferencedSeriesSequence
        }
        assert referenced == images
        in_content = {
            item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for item in ds.ContentSequence
            if item.ValueType == "IMAGE"
        }
        assert in_content == set().union(*images.values())


def test_large_frame_helper_matches_pydicom(samples: SampleSet) -> None:
    ds = pydicom.dcmread(samples.large.path)
    assert (ds.NumberOfFrames, ds.Rows, ds.Columns) == (110, 512, 512)
    pixels = ds.pixel_array
    assert samples.large.frame(110) == pixels[109].tobytes()
    assert samples.large.frame(1) != samples.large.frame(2)


def test_qido_lists_and_pages_all_studies(orthanc: OrthancServer, samples: SampleSet) -> None:
    studies = _studies(orthanc)
    assert {s["0020000D"]["Value"][0] for s in studies} == set(samples.all_study_uids())  # type: ignore[index]
    assert len(_studies(orthanc, limit="5", offset="10")) == 3
    assert len(_studies(orthanc, PatientID="HARN00001")) == 3


def test_large_instance_last_frame(orthanc: OrthancServer, samples: SampleSet) -> None:
    large = samples.large
    url = (
        f"{orthanc.dicomweb_url}/studies/{large.study_uid}/series/{large.series_uid}"
        f"/instances/{large.sop_uid}/frames/110"
    )
    response = httpx.get(url, headers={"Accept": OCTET_FRAMES}, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(
        'multipart/related; type="application/octet-stream'
    )
    headers, body = _single_part(response)
    assert b"Content-Type: application/octet-stream" in headers
    assert len(body) == large.rows * large.columns * 2
    assert body == large.frame(110)


def test_start_failure_shows_the_log(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        server = OrthancServer(tmp_path, port=busy.getsockname()[1])
        with pytest.raises(OrthancError, match="exited with code"):
            server.start()
    assert not server.running
    server.stop()  # idempotent


def test_authentication(tmp_path: Path, samples: SampleSet) -> None:
    server = OrthancServer(tmp_path, extra_config={"RegisteredUsers": {"alice": "secret"}})
    assert server.config["DicomWeb"] == {"Enable": True, "Root": "/dicom-web/"}  # deep merge
    with server:
        assert server.auth == ("alice", "secret")
        assert server.load(samples.files[:2]) == 2  # load() authenticates by itself
        studies = f"{server.dicomweb_url}/studies"
        assert httpx.get(studies).status_code == 401
        assert len(httpx.get(studies, auth=("alice", "secret")).json()) == 1
        server.kill()  # faster than Orthanc's ~2 s graceful shutdown


def test_restart_keeps_data(tmp_path: Path, samples: SampleSet) -> None:
    # A server of its own: the session's Orthanc serves the other tests meanwhile.
    orthanc = OrthancServer(tmp_path)
    with orthanc:
        orthanc.load(samples.files[:20])
        loaded = len(_studies(orthanc))
        assert loaded >= 2
        port, pid = orthanc.port, orthanc.pid
        orthanc.restart()
        assert (orthanc.port, orthanc.url) == (port, f"http://127.0.0.1:{port}")
        assert orthanc.pid != pid
        assert len(_studies(orthanc)) == loaded
        orthanc.kill()  # a crash, not a clean shutdown
        assert not orthanc.running
        orthanc.start()
        assert len(_studies(orthanc)) == loaded
        orthanc.kill()
