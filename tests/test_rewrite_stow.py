"""STOW-RS with identifier translation and write rights, against a real Orthanc: instances
saved with public UIDs land with real ones, per-instance rights, merged answers, and uploads
that are refused whole."""

from __future__ import annotations

import io
import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from joserfc.jwk import RSAKey
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from shanoir_dicomweb_proxy import Settings, Upstream, UpstreamSettings
from shanoir_dicomweb_proxy._auth import dev_token
from shanoir_dicomweb_proxy._store import SqliteStore, sync_store
from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer, SampleSet
from shanoir_dicomweb_proxy.testing._process import resident_memory

from .support.relay import RecordingRelay
from .support.settings import ProxyFactory
from .support.waiting import wait_for, whole_lines

STUDY_ROOT, SERIES_ROOT = "1.4.9.12.34.1.8527", "1.4.9.12.34.2.8527"
LIMIT = 8 * 1024 * 1024  # [server] max_upload_bytes of the limited proxy
NOT_AUTHORIZED = 0x0124


def _instance(template: Path, study: str, series: str) -> Dataset:
    ds = pydicom.dcmread(template)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _multipart(payloads: list[bytes], boundary: str = "b0undary") -> bytes:
    body = b""
    for payload in payloads:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += payload + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=b0undary'
#: The tests that run on both proxies: one spools uploads, the other streams them.
UPLOADING = pytest.mark.parametrize("proxy", ["proxy", "streaming"])


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory, samples: SampleSet, proxy_factory: ProxyFactory
) -> Iterator[dict[str, Any]]:
    """An Orthanc of its own with studies A, B and C (one series of one image each), synced;
    alice may write into A and C and only read B; a second proxy limits uploads, a third
    streams them ([upstream] stream_uploads) through a relay that records what it sent."""
    folder = tmp_path_factory.mktemp("stow-mapped")
    with (
        OrthancServer(folder / "orthanc") as orthanc,
        RecordingRelay(("127.0.0.1", orthanc.port)) as relay,
    ):
        template = samples.files[0]
        real = {name: (generate_uid(), generate_uid()) for name in "ABC"}
        direct = DICOMwebClient(orthanc.dicomweb_url)
        direct.store_instances([_instance(template, *real[name]) for name in "ABC"])
        store = folder / "store.sqlite3"
        upstream = Upstream(UpstreamSettings(url=orthanc.dicomweb_url, transport="httpx"))

        async def sync() -> None:
            with SqliteStore(store) as opened:
                await sync_store(opened, upstream)
            await upstream.aclose()

        anyio.run(sync)
        with SqliteStore(store) as opened:
            exams = {e.study_uid: e for e in opened.entries()}
            public = {}
            for name, (study, _series) in real.items():
                entry = exams[study]
                (acquisition,) = entry.acquisitions
                public[name] = (
                    f"{STUDY_ROOT}.{entry.exam_id}",
                    f"{SERIES_ROOT}.{acquisition.acquisition_id}",
                )
            for name, action in (("A", "write"), ("A", "read"), ("B", "read"), ("C", "write")):
                opened.grant("alice", exams[real[name][0]].exam_id, action)
        keys = folder / "keys.json"
        key = RSAKey.generate_key(2048, parameters={"kid": "k"}, private=True)
        keys.write_text(json.dumps({"keys": [key.as_dict(private=True)]}))
        sections: dict[str, Any] = {
            "auth": {"enabled": True, "jwks_file": str(keys), "audience": ["dicomweb-proxy"]},
            "mapping": {
                "backend": "sqlite",
                "study_root": STUDY_ROOT,
                "series_root": SERIES_ROOT,
            },
            "access": {"backend": "sqlite"},
            "store": {"path": str(store)},
            "logging": {"audit_log": str(folder / "audit.jsonl")},
        }
        proxy = proxy_factory(orthanc.dicomweb_url, **sections)
        limited = proxy_factory(
            orthanc.dicomweb_url,
            **{
                **sections,
                "server": {"max_upload_bytes": LIMIT},
                "logging": {"audit_log": str(folder / "audit-limited.jsonl")},
            },
        )
        streaming = proxy_factory(
            relay.url("/dicom-web"),
            **{
                **sections,
                "upstream": {"stream_uploads": True},
                "logging": {"audit_log": str(folder / "audit-streaming.jsonl")},
            },
        )
        settings = Settings.from_toml(proxy.config_path)
        token = dev_token(settings, "alice", {"userId": "alice"}, ttl=3600)
        yield {
            "orthanc": orthanc,
            "direct": direct,
            "proxy": proxy,
            "limited": limited,
            "streaming": streaming,
            "relay": relay,
            "real": real,
            "public": public,
            "headers": {"Authorization": f"Bearer {token}"},
            "template": template,
            "audit": {
                "proxy": folder / "audit.jsonl",
                "streaming": folder / "audit-streaming.jsonl",
            },
        }


def _client(site: dict[str, Any], proxy: str = "proxy") -> DICOMwebClient:
    server: ProxyServer = site[proxy]
    return DICOMwebClient(server.dicomweb_url, headers=site["headers"])


def _post(
    site: dict[str, Any], body: bytes, path: str = "/studies", proxy: str = "proxy", **kw: Any
) -> httpx.Response:
    headers = {**site["headers"], "Content-Type": STOW_TYPE, **kw.pop("headers", {})}
    url = site[proxy].dicomweb_url + path
    return httpx.post(url, content=body, headers=headers, timeout=120, **kw)


def _held(site: dict[str, Any], sop: str) -> bool:
    """Whether Orthanc holds the instance, asked directly."""
    return bool(site["direct"].search_for_instances(search_filters={"SOPInstanceUID": sop}))


def _seg_like(site: dict[str, Any], study: str, series: str, referenced: str) -> Dataset:
    """A new instance in a new series of ``study``, referencing ``referenced`` (a public
    series) at two depths, as a viewer saves a segmentation."""
    ds = _instance(site["template"], study, series)
    ds.ReferencedSeriesSequence = Sequence([Dataset()])
    ds.ReferencedSeriesSequence[0].SeriesInstanceUID = referenced
    other = Dataset()
    other.StudyInstanceUID = study
    other.ReferencedSeriesSequence = Sequence([Dataset()])
    other.ReferencedSeriesSequence[0].SeriesInstanceUID = referenced
    ds.StudiesContainingOtherReferencedInstancesSequence = Sequence([other])
    return ds


@UPLOADING
def test_saved_with_public_uids_lands_with_real_ones(site: dict[str, Any], proxy: str) -> None:
    study, series = site["public"]["A"]
    real_study, real_series = site["real"]["A"]
    client = _client(site, proxy)
    before = {r["0020000E"]["Value"][0] for r in client.search_for_series(study)}
    assert series in before and all(uid.startswith(f"{SERIES_ROOT}.") for uid in before)
    new_series = generate_uid()
    ds = _seg_like(site, study, new_series, series)
    result = client.store_instances([ds])
    (stored,) = result.ReferencedSOPSequence
    assert stored.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert "FailedSOPSequence" not in result
    # The new series got a public ID at once: the RetrieveURL names it.
    url = stored.RetrieveURL
    assert f"/studies/{study}/series/{SERIES_ROOT}." in url
    assert real_study not in url and new_series not in url
    # The PACS holds real UIDs only, nested ones too.
    back = site["direct"].retrieve_instance(real_study, new_series, ds.SOPInstanceUID)
    assert back.StudyInstanceUID == real_study
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == real_series
    nested = back.StudiesContainingOtherReferencedInstancesSequence[0]
    assert nested.StudyInstanceUID == real_study
    assert nested.ReferencedSeriesSequence[0].SeriesInstanceUID == real_series
    assert back.PixelData == ds.PixelData
    # And it is back through the proxy under its examination, in public UIDs.
    public_series = url.split("/series/")[1].split("/")[0]
    rows = client.search_for_series(study)
    assert public_series not in before
    assert {r["0020000E"]["Value"][0] for r in rows} == before | {public_series}
    (again,) = client.retrieve_series(study, public_series)
    assert again.StudyInstanceUID == study and again.SeriesInstanceUID == public_series
    assert again.ReferencedSeriesSequence[0].SeriesInstanceUID == series


@UPLOADING
def test_read_only_and_unknown_examinations_are_refused(site: dict[str, Any], proxy: str) -> None:
    read_only, _ = site["public"]["B"]
    ds = _instance(site["template"], read_only, generate_uid())
    unknown = _instance(site["template"], f"{STUDY_ROOT}.99999", generate_uid())
    real = _instance(site["template"], site["real"]["C"][0], generate_uid())  # a real UID
    response = _post(site, _multipart([_bytes(x) for x in (ds, unknown, real)]), proxy=proxy)
    assert response.status_code == 409, response.text
    failed = response.json()["00081198"]["Value"]
    assert [f["00081155"]["Value"][0] for f in failed] == [
        x.SOPInstanceUID for x in (ds, unknown, real)
    ]
    assert {f["00081197"]["Value"][0] for f in failed} == {NOT_AUTHORIZED}
    assert "00081199" not in response.json()
    assert not any(_held(site, x.SOPInstanceUID) for x in (ds, unknown, real))


@UPLOADING
def test_mixed_batch_is_202_and_stores_only_the_allowed(site: dict[str, Any], proxy: str) -> None:
    mine = _instance(site["template"], site["public"]["C"][0], site["public"]["C"][1])
    theirs = _instance(site["template"], site["public"]["B"][0], site["public"]["B"][1])
    # A public series of another examination under my study is refused too.
    crossed = _instance(site["template"], site["public"]["A"][0], site["public"]["C"][1])
    response = _post(site, _multipart([_bytes(x) for x in (mine, theirs, crossed)]), proxy=proxy)
    assert response.status_code == 202, response.text
    answer = response.json()
    (stored,) = answer["00081199"]["Value"]
    assert stored["00081155"]["Value"] == [mine.SOPInstanceUID]
    failed = {f["00081155"]["Value"][0] for f in answer["00081198"]["Value"]}
    assert failed == {theirs.SOPInstanceUID, crossed.SOPInstanceUID}
    assert _held(site, mine.SOPInstanceUID)
    assert not _held(site, theirs.SOPInstanceUID) and not _held(site, crossed.SOPInstanceUID)
    # Stored into the real series of C, which is still the one public series of C.
    real_study, real_series = site["real"]["C"]
    assert site["direct"].retrieve_instance(real_study, real_series, mine.SOPInstanceUID)
    audit = site["audit"][proxy]
    uids = [x.SOPInstanceUID for x in (mine, theirs, crossed)]
    wait_for(lambda: all(u in "".join(whole_lines(audit)) for u in uids), "the audit lines")
    lines = [json.loads(x) for x in whole_lines(audit)]
    by_instance = {line.get("instance"): line for line in lines if line.get("instance")}
    assert by_instance[mine.SOPInstanceUID]["decision"] == "allow"
    assert by_instance[theirs.SOPInstanceUID]["decision"] == "deny"
    assert by_instance[theirs.SOPInstanceUID]["user_id"] == "alice"


@UPLOADING
def test_study_path_refuses_instances_of_another_study(site: dict[str, Any], proxy: str) -> None:
    study_a, series_a = site["public"]["A"]
    foreign = _instance(site["template"], site["public"]["C"][0], site["public"]["C"][1])
    own = _instance(site["template"], study_a, series_a)
    response = _post(
        site, _multipart([_bytes(foreign), _bytes(own)]), f"/studies/{study_a}", proxy=proxy
    )
    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer["00081190"]["Value"][0].endswith(f"/studies/{study_a}")
    assert [f["00081155"]["Value"][0] for f in answer["00081198"]["Value"]] == [
        foreign.SOPInstanceUID
    ]
    assert not _held(site, foreign.SOPInstanceUID) and _held(site, own.SOPInstanceUID)
    # A study the caller may not write into is refused as a path, before the body is read.
    read_only = site["public"]["B"][0]
    response = _post(site, _multipart([_bytes(own)]), f"/studies/{read_only}", proxy=proxy)
    assert response.status_code == 404
    assert response.json()["detail"] == "no such study"


def _big(site: dict[str, Any], size: int) -> Dataset:
    ds = _instance(site["template"], *site["public"]["A"])
    side = int((size // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelRepresentation = 0
    ds.PixelData = np.zeros((side, side), dtype=np.uint16).tobytes()
    if "NumberOfFrames" in ds:
        del ds.NumberOfFrames
    return ds


def test_oversized_upload_is_413_and_stores_nothing(site: dict[str, Any]) -> None:
    small = _instance(site["template"], *site["public"]["A"])
    big = _big(site, LIMIT + 1024)
    body = _multipart([_bytes(small), _bytes(big)])
    response = _post(site, body, proxy="limited")
    assert response.status_code == 413, response.text

    def chunked() -> Iterator[bytes]:
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    headers = {**site["headers"], "Content-Type": STOW_TYPE}
    url = site["limited"].dicomweb_url + "/studies"
    response = httpx.post(url, content=chunked(), headers=headers, timeout=120)
    assert response.status_code == 413, response.text
    assert "exceeds" in response.json()["detail"]
    assert not _held(site, small.SOPInstanceUID) and not _held(site, big.SOPInstanceUID)


@pytest.mark.parametrize(
    ("case", "detail"),
    [
        ("not multipart", "multipart"),
        ("not dicom", "DICM"),
        ("truncated part", "truncated DICOM"),
        ("no closing delimiter", "ends before its last part"),
        ("no part", "no instance"),
    ],
)
@UPLOADING
def test_malformed_upload_is_400_and_stores_nothing(
    site: dict[str, Any], case: str, detail: str, proxy: str
) -> None:
    good = _instance(site["template"], *site["public"]["A"])
    payload = _bytes(good)
    if case == "not multipart":
        body = b"this is no multipart body at all" * 10
    elif case == "not dicom":
        body = _multipart([payload, b"\x00" * 200 + b"hello"])
    elif case == "no part":
        body = b"--b0undary--\r\n"
    elif case == "truncated part":
        body = _multipart([payload, payload[: len(payload) // 2]])
    else:
        body = _multipart([payload])[:-40]
    response = _post(site, body, proxy=proxy)
    assert response.status_code == 400, response.text
    assert detail in response.json()["detail"]
    assert not _held(site, good.SOPInstanceUID)


def _relayed_since(site: dict[str, Any], start: int) -> int:
    return len(site["relay"].sent) - start


def test_a_streamed_upload_reaches_the_pacs_as_it_comes_and_a_bad_end_stores_nothing(
    site: dict[str, Any],
) -> None:
    good = [_big(site, 2 * 1024 * 1024) for _ in range(3)]
    payloads = [_bytes(ds) for ds in good]
    truncated = payloads[0][: len(payloads[0]) // 2]
    body = _multipart([*payloads, truncated])
    bad_part = len(_multipart(payloads)) - len(b"--b0undary--\r\n")
    start = len(site["relay"].sent)

    def chunks() -> Iterator[bytes]:
        yield body[:bad_part]
        # The PACS has the three good instances before the client has sent the bad part.
        wait_for(
            lambda: _relayed_since(site, start) > sum(map(len, payloads)),
            "the admitted instances did not reach the PACS while the upload went on",
        )
        yield body[bad_part:]

    headers = {**site["headers"], "Content-Type": STOW_TYPE, "Content-Length": str(len(body))}
    url = site["streaming"].dicomweb_url + "/studies"
    response = httpx.post(url, content=chunks(), headers=headers, timeout=120)
    assert response.status_code == 400, response.text
    assert "truncated DICOM" in response.json()["detail"]
    # Its request was cut off short of its length: Orthanc, which stores the sound parts of a
    # whole batch, stored nothing.
    assert not any(_held(site, ds.SOPInstanceUID) for ds in good)


def test_a_streamed_upload_the_client_leaves_stores_nothing(site: dict[str, Any]) -> None:
    good = [_big(site, 2 * 1024 * 1024) for _ in range(2)]
    payloads = [_bytes(ds) for ds in good]
    sent = _multipart(payloads)[: -len(b"--b0undary--\r\n")]
    start = len(site["relay"].sent)
    proxy: ProxyServer = site["streaming"]
    with socket.create_connection(("127.0.0.1", proxy.port)) as client:
        head = (
            f"POST {proxy.base_path}/studies HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nAuthorization: {site['headers']['Authorization']}\r\n"
            f"Content-Type: {STOW_TYPE}\r\nContent-Length: {len(sent) + 1_000_000}\r\n\r\n"
        )
        client.sendall(head.encode() + sent)
        wait_for(
            lambda: _relayed_since(site, start) > sum(map(len, payloads)),
            "the admitted instances did not reach the PACS while the upload went on",
        )
    time.sleep(1.0)  # what the PACS would do with a completed body, it would have done
    assert not any(_held(site, ds.SOPInstanceUID) for ds in good)


def test_a_streamed_upload_whose_uids_outgrow_the_room_kept_is_sent_whole(
    site: dict[str, Any],
) -> None:
    """Thousands of references to a public series: the real UIDs outgrow what the streamed
    request announced, so it is cut off and the spooled batch goes instead, whole."""
    study, series = site["public"]["A"]
    real_study, real_series = site["real"]["A"]
    references = 3000
    ds = _instance(site["template"], study, series)
    items = []
    for _ in range(references):
        item = Dataset()
        item.SeriesInstanceUID = series
        items.append(item)
    ds.ReferencedSeriesSequence = Sequence(items)
    payload = _bytes(ds)
    growth = (len(real_series) - len(series) - 1) * references
    assert growth > 64 * 1024 + len(payload) // 256  # more than the room kept
    response = _post(site, _multipart([payload]), proxy="streaming")
    assert response.status_code == 200, response.text
    back = site["direct"].retrieve_instance(real_study, real_series, ds.SOPInstanceUID)
    assert back.SeriesInstanceUID == real_series
    assert {item.SeriesInstanceUID for item in back.ReferencedSeriesSequence} == {real_series}
    assert len(back.ReferencedSeriesSequence) == references


def test_unsupported_upload_types_are_415(site: dict[str, Any]) -> None:
    response = _post(site, b"[]", headers={"Content-Type": "application/dicom+json"})
    assert response.status_code == 415
    body = b"--b0undary\r\nContent-Type: application/dicom+json\r\n\r\n[]\r\n--b0undary--\r\n"
    response = _post(site, body)
    assert response.status_code == 415
    assert "application/dicom" in response.json()["detail"]


@pytest.mark.slow
@UPLOADING
def test_a_large_upload_streams_with_bounded_memory(site: dict[str, Any], proxy: str) -> None:
    """500 MB in 10 instances of 50 MB: the proxy's peak memory stays far below it. (Sent
    with a Content-Length: streamed, its request is padded with 2 MiB of room.)"""
    big = _big(site, 50 * 1024 * 1024)
    big.SOPInstanceUID = big.file_meta.MediaStorageSOPInstanceUID = _sop_uid()
    template = _bytes(big)
    sops: list[str] = []

    def body() -> Iterator[bytes]:
        for _ in range(10):
            ds = pydicom.dcmread(io.BytesIO(template))
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _sop_uid()
            sops.append(ds.SOPInstanceUID)
            yield b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n"
            payload = _bytes(ds)
            for start in range(0, len(payload), 1024 * 1024):
                yield payload[start : start + 1024 * 1024]
            yield b"\r\n"
        yield b"--b0undary--\r\n"

    pid = site[proxy].pid
    with open(f"/proc/{pid}/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak (VmHWM) to the current resident size
    before = resident_memory(pid)
    length = 10 * (len(b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n\r\n"))
    length += 10 * len(template) + len(b"--b0undary--\r\n")  # every SOP UID as long
    headers = {**site["headers"], "Content-Type": STOW_TYPE, "Content-Length": str(length)}
    started = time.monotonic()
    response = httpx.post(
        site[proxy].dicomweb_url + "/studies", content=body(), headers=headers, timeout=600
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert len(response.json()["00081199"]["Value"]) == 10
    peak = _peak_memory(pid)
    assert peak - before < 128 * 1024 * 1024, (before, peak, elapsed)
    assert all(_held(site, sop) for sop in sops)


def _sop_uid() -> str:
    """A new UID of always the same length (2.25 and a UUID as a number)."""
    return f"2.25.1{uuid.uuid4().int:039d}"


def _peak_memory(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")
