"""A document in a granted examination that points into another one: an SR of study A whose
evidence, referenced study and content items name study B. A caller granted A only must not
learn B's UIDs or public IDs from any answer about the SR, in any form; one granted both sees
B's public IDs there (so the data does carry them)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pydicom
import pytest
from joserfc.jwk import RSAKey
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from shanoir_dicomweb_proxy import Settings, Upstream, UpstreamSettings
from shanoir_dicomweb_proxy._auth import dev_token
from shanoir_dicomweb_proxy._store import SqliteStore, sync_store
from shanoir_dicomweb_proxy.testing import OrthancServer, SampleSet

from .support.archive import SERIES_ROOT, STUDY_ROOT
from .support.dicomweb import DICOM, XML, parts
from .support.settings import ProxyFactory

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
SR_SERIES = "1.2.826.0.1.3680043.8.498.4545.2"
SR_SOP = "1.2.826.0.1.3680043.8.498.4545.3"


def _cross_study_sr(samples: SampleSet, folder: Path) -> Path:
    """An SR in study A that refers to study B, its series and an instance of it."""
    a, b = samples.small_studies[0], samples.small_studies[1]
    target = b.series[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(SR_CLASS)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(SR_SOP)
    ds.SOPClassUID, ds.SOPInstanceUID = SR_CLASS, SR_SOP
    ds.StudyInstanceUID, ds.SeriesInstanceUID = a.uid, SR_SERIES
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SR", 77, 1
    ds.PatientID, ds.PatientName = a.patient_id, a.patient_name
    image = Dataset()
    image.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    image.ReferencedSOPInstanceUID = target.instances[0]
    series = Dataset()
    series.SeriesInstanceUID = target.uid
    series.ReferencedSOPSequence = Sequence([image])
    evidence = Dataset()
    evidence.StudyInstanceUID = b.uid
    evidence.ReferencedSeriesSequence = Sequence([series])
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study_ref.ReferencedSOPInstanceUID = b.uid
    ds.ReferencedStudySequence = Sequence([study_ref])
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "IMAGE"
    item.ReferencedSOPSequence = Sequence([image])
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ContentSequence = Sequence([item])
    path = folder / "cross-study-sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, samples: SampleSet, proxy_factory: ProxyFactory
) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("references")
    small = [p for p in samples.files if p != samples.large.path]
    with OrthancServer(folder / "orthanc") as orthanc:
        assert orthanc.load([*small, _cross_study_sr(samples, folder)]) == len(small) + 1
        store_path = folder / "store.sqlite3"
        upstream = Upstream(UpstreamSettings(url=orthanc.dicomweb_url, transport="httpx"))

        async def sync() -> None:
            with SqliteStore(store_path) as store:
                await sync_store(store, upstream)
            await upstream.aclose()

        anyio.run(sync)
        a, b = samples.small_studies[0], samples.small_studies[1]
        with SqliteStore(store_path) as store:
            entries = {e.study_uid: e for e in store.entries()}
            for user, studies in (("1", [a]), ("2", [a, b])):
                for study in studies:
                    store.grant(user, entries[study.uid].exam_id, "read")
        keys = folder / "keys.json"
        key = RSAKey.generate_key(2048, parameters={"kid": "k"}, private=True)
        keys.write_text(json.dumps({"keys": [key.as_dict(private=True)]}))
        proxy = proxy_factory(
            orthanc.dicomweb_url,
            auth={"enabled": True, "jwks_file": str(keys), "audience": ["dicomweb-proxy"]},
            mapping={"backend": "sqlite", "study_root": STUDY_ROOT, "series_root": SERIES_ROOT},
            access={"backend": "sqlite"},
            store={"path": str(store_path)},
            logging={"audit_log": ""},
        )
        settings = Settings.from_toml(proxy.config_path)
        entry_a, entry_b = entries[a.uid], entries[b.uid]
        sr_series = next(s for s in entry_a.acquisitions if s.series_uid == SR_SERIES)
        yield {
            "proxy": proxy,
            "token": lambda user: dev_token(settings, user, {"userId": user}, ttl=600),
            "a": f"{STUDY_ROOT}.{entry_a.exam_id}",
            "sr_series": f"{SERIES_ROOT}.{sr_series.acquisition_id}",
            # Everything that names B: real and public study and series UIDs.
            "b_names": {
                b.uid,
                f"{STUDY_ROOT}.{entry_b.exam_id}",
                *(s.series_uid for s in entry_b.acquisitions),
                *(f"{SERIES_ROOT}.{s.acquisition_id}" for s in entry_b.acquisitions),
            },
            "b_public": f"{STUDY_ROOT}.{entry_b.exam_id}",
        }
        proxy.stop()


def _answers(world: dict[str, Any], user: str) -> list[httpx.Response]:
    """Every answer that shows the SR: searches, metadata (JSON and XML), Part 10 retrieves."""
    a, series = world["a"], world["sr_series"]
    instance = f"/studies/{a}/series/{series}/instances/{SR_SOP}"
    headers = {"Authorization": f"Bearer {world['token'](user)}"}
    gets = [
        (f"/studies/{a}/instances?includefield=all", {}),
        ("/instances?includefield=all", {}),
        (f"/studies/{a}/metadata", {}),
        (f"/studies/{a}/metadata", {"Accept": XML}),
        (instance + "/metadata", {}),
        (instance, {"Accept": DICOM}),
        (f"/studies/{a}/series/{series}", {"Accept": DICOM}),
        (f"/studies/{a}", {"Accept": DICOM}),
    ]
    with httpx.Client(base_url=world["proxy"].dicomweb_url, timeout=60) as client:
        answers = [client.get(path, headers={**headers, **extra}) for path, extra in gets]
    for response in answers:
        assert response.status_code == 200, (response.request.url, response.text[:300])
        assert SR_SOP.encode() in response.content, response.request.url  # the SR is there
    return answers


def test_references_into_a_foreign_examination_are_cut(world: dict[str, Any]) -> None:
    answers = _answers(world, "1")
    for response in answers:
        shown = response.content + str(response.headers).encode()
        leaked = [name for name in world["b_names"] if name.encode() in shown]
        assert not leaked, (response.request.url, leaked)


def test_a_referenced_foreign_instance_cannot_be_found(
    world: dict[str, Any], samples: SampleSet
) -> None:
    # SOP Instance UIDs are never translated, so the SR still names B's instance; searching
    # for it is decided on B like any search, and finds nothing.
    foreign = samples.small_studies[1].series[0].instances[0]
    for user, found in (("1", 0), ("2", 1)):
        headers = {"Authorization": f"Bearer {world['token'](user)}"}
        response = httpx.get(
            world["proxy"].dicomweb_url + "/instances",
            params={"SOPInstanceUID": foreign},
            headers=headers,
        )
        assert response.status_code == 200
        assert len(response.json()) == found


def test_references_into_a_granted_examination_are_public(world: dict[str, Any]) -> None:
    answers = _answers(world, "2")
    for response in answers[2:]:  # searches do not show sequences
        assert world["b_public"].encode() in response.content, response.request.url
        real = [n for n in world["b_names"] if not n.startswith(STUDY_ROOT + ".")]
        real = [n for n in real if not n.startswith(SERIES_ROOT + ".")]
        assert not [n for n in real if n.encode() in response.content], response.request.url
    (_, body), *_ = parts(answers[5])
    ds = pydicom.dcmread(io.BytesIO(body))
    assert ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID == world["b_public"]
