"""STOW-RS through the proxy (identity mapping): uploads stream through and land whole."""

from __future__ import annotations

import io
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer, SampleSet

from .support.settings import ProxyFactory


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """An Orthanc of its own: uploads must not change what the other tests count."""
    with OrthancServer(tmp_path_factory.mktemp("stow-orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def stow_proxy(store: OrthancServer, proxy_factory: ProxyFactory) -> ProxyServer:
    return proxy_factory(store.dicomweb_url, server={"max_upload_bytes": 2 * 1024 * 1024})


def _copy(path: Path) -> pydicom.Dataset:
    """A sample instance with fresh UIDs, so that every test stores something new."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_store_instances_with_dicomweb_client(
    stow_proxy: ProxyServer, store: OrthancServer, samples: SampleSet
) -> None:
    datasets = [_copy(p) for p in samples.files[:3]]
    result = DICOMwebClient(stow_proxy.dicomweb_url).store_instances(datasets)
    stored = [item.ReferencedSOPInstanceUID for item in result.ReferencedSOPSequence]
    assert sorted(stored) == sorted(ds.SOPInstanceUID for ds in datasets)
    direct = DICOMwebClient(store.dicomweb_url)
    for ds in datasets:
        back = direct.retrieve_instance(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        )
        assert back.PixelData == ds.PixelData
        assert back.PatientID == ds.PatientID


def test_store_into_study_path(stow_proxy: ProxyServer, samples: SampleSet) -> None:
    ds = _copy(samples.files[5])
    client = DICOMwebClient(stow_proxy.dicomweb_url)
    result = client.store_instances([ds], study_instance_uid=ds.StudyInstanceUID)
    assert result.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert client.search_for_instances(ds.StudyInstanceUID)[0]["00080018"]["Value"] == [
        ds.SOPInstanceUID
    ]


def _multipart(payloads: list[bytes], boundary: str) -> bytes:
    body = b""
    for payload in payloads:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += payload + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_upload_is_413_and_nothing_is_stored(
    stow_proxy: ProxyServer, store: OrthancServer, samples: SampleSet, chunked: bool
) -> None:
    ds = _copy(samples.files[1])
    boundary = uuid.uuid4().hex
    payload = _bytes(ds)
    # Pad the batch past the 2 MiB limit with copies of the same instance.
    body = _multipart([payload] * (2 * 1024 * 1024 // len(payload) + 2), boundary)
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    response = httpx.post(
        stow_proxy.dicomweb_url + "/studies",
        content=chunks() if chunked else body,
        headers={"content-type": content_type, "accept": "application/dicom+json"},
        timeout=30,
    )
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"
    found = httpx.get(
        f"{store.dicomweb_url}/studies", params={"StudyInstanceUID": ds.StudyInstanceUID}
    )
    assert found.json() == []


def test_chunked_upload_lands_whole(
    stow_proxy: ProxyServer, store: OrthancServer, samples: SampleSet
) -> None:
    ds = _copy(samples.files[2])
    boundary = uuid.uuid4().hex
    body = _multipart([_bytes(ds)], boundary)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    response = httpx.post(
        stow_proxy.dicomweb_url + "/studies",
        content=chunks(),
        headers={
            "content-type": f"multipart/related; type=application/dicom; boundary={boundary}",
            "accept": "application/dicom+json",
        },
    )
    assert response.status_code == 200, response.text
    back = DICOMwebClient(store.dicomweb_url).retrieve_instance(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    assert back.PixelData == ds.PixelData


@pytest.mark.parametrize("chunked", [False, True])
def test_client_hanging_up_mid_upload_stores_nothing(
    stow_proxy: ProxyServer, store: OrthancServer, samples: SampleSet, chunked: bool
) -> None:
    ds = _copy(samples.files[3])
    boundary = uuid.uuid4().hex
    body = _multipart([_bytes(ds)] * 60, boundary)  # ~600 kB, under the limit
    head = (
        f"POST {stow_proxy.base_path}/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}\r\n'
    )
    sent = body[: len(body) // 2]
    with socket.create_connection(("127.0.0.1", stow_proxy.port)) as sock:
        if chunked:
            sock.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
            sock.sendall(b"%x\r\n" % len(sent) + sent + b"\r\n")
        else:
            sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + sent)
        time.sleep(0.5)
    time.sleep(1.0)
    found = httpx.get(
        f"{store.dicomweb_url}/studies", params={"StudyInstanceUID": ds.StudyInstanceUID}
    )
    assert found.json() == []


def test_a_refused_upload_gets_the_pacs_answer_per_instance(
    stow_proxy: ProxyServer, store: OrthancServer, samples: SampleSet
) -> None:
    """PS3.18 §10.5.3: the PACS's answer to a refused batch names each instance and why; the
    client gets it (with links to the proxy), not a problem body that names nothing."""
    good, elsewhere = _copy(samples.files[2]), _copy(samples.files[3])
    boundary = uuid.uuid4().hex
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    headers = {"content-type": content_type, "accept": "application/dicom+json"}
    # One instance and a part that is no DICOM: Orthanc stores the first and answers 400.
    body = _multipart([_bytes(good), b"not DICOM"], boundary)
    response = httpx.post(stow_proxy.dicomweb_url + "/studies", content=body, headers=headers)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/dicom+json"
    answer = response.json()
    [stored] = answer["00081199"]["Value"]
    assert stored["00081155"]["Value"] == [good.SOPInstanceUID]
    assert stored["00081190"]["Value"][0].startswith(stow_proxy.dicomweb_url)
    # An instance of another study than the path's: refused, with the reason the PACS gives.
    path = f"{stow_proxy.dicomweb_url}/studies/{generate_uid()}"
    response = httpx.post(path, content=_multipart([_bytes(elsewhere)], boundary), headers=headers)
    assert response.status_code == 409
    [failed] = response.json()["00081198"]["Value"]
    assert failed["00081155"]["Value"] == [elsewhere.SOPInstanceUID]
    assert failed["00081197"]["Value"] == [0x0110]
    assert store.url not in response.text
