"""The ``shanoir`` backends in process, against a Shanoir-NG API on loopback (written from
SHANOIR.md), tokens from the tests' OpenID provider, and the real Orthanc for the series.

The world: research study 10 (alice: CAN_SEE_ALL + CAN_DOWNLOAD; bob: CAN_SEE_ALL, not
confirmed) and study 20 (alice: CAN_SEE_ALL + CAN_IMPORT on centre 1; bob: CAN_SEE_ALL +
CAN_DOWNLOAD on centre 2). Examinations: 101 (study 10, centre 1), 102 (study 20, centre 1),
103 (study 20, centre 2), 104 (study 10, imported before Shanoir kept StudyInstanceUIDs), 105 (a
copy of 101 into study 20, centre 2: the same real study, with only its first acquisition).
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from shanoir_dicomweb_proxy import (
    ALL,
    Principal,
    Settings,
    ShanoirUnavailable,
    Upstream,
    UpstreamSettings,
)
from shanoir_dicomweb_proxy._backends import (
    ShanoirAccessPolicy,
    ShanoirIdentifierMap,
    shanoir_directory,
)
from shanoir_dicomweb_proxy._dicom import STUDY_INSTANCE_UID, xml_value
from shanoir_dicomweb_proxy._probes import probe_shanoir
from shanoir_dicomweb_proxy._scope import set_principal
from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer

from .support.dicomweb import parts
from .support.idp import USERS, IdentityProvider
from .support.settings import ProxyFactory
from .support.shanoir import (
    Acquisition,
    Examination,
    Member,
    ShanoirServer,
    ShanoirWorld,
    Study,
    serving,
)

#: Shanoir's UID root, for studies and series alike (UIDGeneration.ROOT).
ROOT = "1.4.9.12.34.1.8527"
#: The realm's service account (client credentials of dicomweb-proxy), given ROLE_ADMIN.
SERVICE_ACCOUNT = "00000000-0000-4000-8000-000000000100"


@dataclass
class Archive:
    """The real studies used, and their series by SeriesNumber."""

    studies: list[str]
    series: dict[str, dict[int, str]]  # study UID → SeriesNumber → series UID
    names: dict[str, str]  # study UID → PatientName


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityProvider]:
    with IdentityProvider(tmp_path_factory.mktemp("idp")) as provider:
        yield provider


@pytest.fixture(scope="module")
def real(orthanc: OrthancServer) -> Archive:
    with httpx.Client(base_url=orthanc.dicomweb_url) as http:
        rows = http.get("/studies", params={"limit": "3", "includefield": "00100010"}).json()
        studies = sorted(r["0020000D"]["Value"][0] for r in rows)
        names = {r["0020000D"]["Value"][0]: r["00100010"]["Value"][0]["Alphabetic"] for r in rows}
        series: dict[str, dict[int, str]] = {}
        for study in studies:
            found = http.get(f"/studies/{study}/series", params={"includefield": "00200011"})
            series[study] = {
                int(r["00200011"]["Value"][0]): r["0020000E"]["Value"][0] for r in found.json()
            }
    return Archive(studies, series, names)


def build_world(idp: IdentityProvider, real: Archive) -> ShanoirWorld:
    s0, s1, s2 = real.studies
    world = ShanoirWorld(issuer=idp.issuer, jwks=idp.public_jwks(), admins={SERVICE_ACCOUNT})
    world.studies = [
        Study(
            10,
            "Brain",
            [
                Member(1, ("CAN_SEE_ALL", "CAN_DOWNLOAD")),
                Member(2, ("CAN_SEE_ALL",), confirmed=False),
            ],
        ),
        Study(
            20,
            "Spine",
            [
                Member(1, ("CAN_SEE_ALL", "CAN_IMPORT"), center_ids=(1,)),
                Member(2, ("CAN_SEE_ALL", "CAN_DOWNLOAD"), center_ids=(2,)),
            ],
        ),
    ]
    world.examinations = [
        Examination(101, 10, 1, 7, "Subject-07", s0, copies=(105,)),
        Examination(102, 20, 1, 8, "Subject-08", s1),
        Examination(103, 20, 2, 9, "Subject-09", s2),
        Examination(104, 10, 1, 7, "Subject-07", None),
        Examination(105, 20, 2, 11, "Subject-11", s0, source=101),
    ]
    next_id = 1000
    for exam in world.examinations:
        if exam.study_instance_uid is None:
            continue
        numbers = sorted(real.series[exam.study_instance_uid])
        for number in numbers[:1] if exam.source is not None else numbers:
            next_id += 1
            world.acquisitions.append(Acquisition(next_id, exam.id, number))
    return world


@pytest.fixture(scope="module")
def shanoir(
    idp: IdentityProvider, real: Archive, orthanc: OrthancServer
) -> Iterator[ShanoirServer]:
    world = build_world(idp, real)
    world.pacs = orthanc.url  # where Shanoir's STOW route stores what it registers
    with serving(world) as server:
        yield server


def settings_for(
    server: ShanoirServer, orthanc: OrthancServer, idp: IdentityProvider, **shanoir: Any
) -> Settings:
    return Settings.from_dict(
        {
            "upstream": {"url": orthanc.dicomweb_url},
            "auth": {"issuer": idp.issuer},
            "mapping": {
                "backend": "shanoir",
                "study_root": ROOT,
                "series_root": ROOT,
            },
            "access": {"backend": "shanoir"},
            "shanoir": {"url": server.url, **shanoir},
        }
    )


def service(idp: IdentityProvider) -> dict[str, Any]:
    return {
        "credentials": "service",
        "service": {
            "token_url": idp.token_url,
            "client_id": "dicomweb-proxy",
            "client_secret": "proxy-secret",
        },
    }


def principal(idp: IdentityProvider, name: str) -> Principal:
    _, user_id, roles = USERS[name]
    return Principal(
        subject=f"sub-{name}",
        user_id=str(user_id),
        username=name,
        roles=frozenset(roles),
        claims={},
        expires_at=time.time() + 300,
        is_admin="ROLE_ADMIN" in roles,
        token_id=f"id-{name}",
        token=idp.password_token(name),
    )


MODES = ["user", "service"]


def _mode(mode: str, idp: IdentityProvider) -> dict[str, Any]:
    return {"credentials": "user"} if mode == "user" else service(idp)


# --- rights, exactly as Shanoir decides them --------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_rights_are_shanoirs(
    mode: str, shanoir: ShanoirServer, orthanc: OrthancServer, idp: IdentityProvider
) -> None:
    directory = shanoir_directory(settings_for(shanoir, orthanc, idp, **_mode(mode, idp)))
    policy = ShanoirAccessPolicy(directory)
    alice, bob, admin = (principal(idp, n) for n in ("alice", "bob", "admin"))
    try:
        # CAN_SEE_ALL: alice's confirmed row in study 10, her centre-1 row in study 20.
        assert await policy.visible(alice, "read") == {101, 102, 104}
        assert await policy.visible(alice, "download") == {101, 104}
        assert await policy.visible(alice, "write") == {102}
        # bob's row in study 10 is not confirmed; his study-20 row holds centre 2 only.
        assert await policy.visible(bob, "read") == {103, 105}
        assert await policy.visible(bob, "download") == {103, 105}
        assert await policy.visible(bob, "write") == frozenset()
        assert await policy.visible(admin, "read") is ALL
        assert await policy.allowed(alice, "read", [101, 103, 105, 999]) == {101}
        assert await policy.allowed(bob, "download", [101, 103]) == {103}
    finally:
        await directory.aclose()


async def test_user_credentials_forward_the_callers_token(
    shanoir: ShanoirServer, orthanc: OrthancServer, idp: IdentityProvider
) -> None:
    directory = shanoir_directory(settings_for(shanoir, orthanc, idp))
    policy = ShanoirAccessPolicy(directory)
    shanoir.world.calls.clear()
    try:
        await policy.visible(principal(idp, "bob"), "read")
    finally:
        await directory.aclose()
    assert {user for _, _, user in shanoir.world.calls} == {2}  # every call as bob


async def test_service_credentials_read_the_matrix_once(
    shanoir: ShanoirServer, orthanc: OrthancServer, idp: IdentityProvider
) -> None:
    directory = shanoir_directory(settings_for(shanoir, orthanc, idp, **service(idp)))
    policy = ShanoirAccessPolicy(directory)
    shanoir.world.calls.clear()
    try:
        for name in ("alice", "bob", "alice"):
            await policy.visible(principal(idp, name), "read")
    finally:
        await directory.aclose()
    paths = [path for _, path, _ in shanoir.world.calls]
    assert sum(p.startswith("/shanoir-ng/studies/studies") for p in paths) == 1
    assert {user for _, _, user in shanoir.world.calls} == {None}  # the service account's


async def test_a_token_without_user_id_sees_nothing(
    shanoir: ShanoirServer, orthanc: OrthancServer, idp: IdentityProvider
) -> None:
    directory = shanoir_directory(settings_for(shanoir, orthanc, idp, **service(idp)))
    nobody = replace(principal(idp, "alice"), user_id=None)
    try:
        assert await ShanoirAccessPolicy(directory).visible(nobody, "read") == frozenset()
    finally:
        await directory.aclose()


# --- identifiers ----------------------------------------------------------------------------


@pytest.fixture
async def upstream(orthanc: OrthancServer) -> AsyncIterator[Upstream]:
    client = Upstream(UpstreamSettings(url=orthanc.dicomweb_url, transport="httpx"))
    yield client
    await client.aclose()


@pytest.mark.parametrize("mode", MODES)
async def test_examinations_are_their_studies_and_copies_their_own(
    mode: str,
    shanoir: ShanoirServer,
    orthanc: OrthancServer,
    idp: IdentityProvider,
    real: Archive,
    upstream: Upstream,
) -> None:
    s0, s1, s2 = real.studies
    directory = shanoir_directory(settings_for(shanoir, orthanc, idp, **_mode(mode, idp)))
    identifiers = ShanoirIdentifierMap(directory, upstream)
    try:
        set_principal({}, principal(idp, "alice"))
        assert await identifiers.studies_by_id([101, 102, 104, 999]) == {101: s0, 102: s1}
        assert await identifiers.studies_by_uid([s0, s1, s2]) == {s0: 101, s1: 102}
        set_principal({}, principal(idp, "bob"))
        # bob sees the real study of 101 only as its copy, 105.
        assert await identifiers.studies_by_uid([s0, s1, s2]) == {s0: 105, s2: 103}
    finally:
        await directory.aclose()


@pytest.mark.parametrize("mode", MODES)
async def test_acquisitions_are_the_series_of_their_sorting_index(
    mode: str,
    shanoir: ShanoirServer,
    orthanc: OrthancServer,
    idp: IdentityProvider,
    real: Archive,
    upstream: Upstream,
) -> None:
    s0 = real.studies[0]
    world = shanoir.world
    acquisitions = {a.id: a for a in world.acquisitions}
    of_101 = [a for a in world.acquisitions if a.examination_id == 101]
    of_105 = [a for a in world.acquisitions if a.examination_id == 105]
    directory = shanoir_directory(settings_for(shanoir, orthanc, idp, **_mode(mode, idp)))
    identifiers = ShanoirIdentifierMap(directory, upstream)
    try:
        set_principal({}, principal(idp, "alice"))
        found = await identifiers.series_by_id([a.id for a in of_101])
        assert {a: (e.exam_id, e.series_uid) for a, e in found.items()} == {
            a.id: (101, real.series[s0][a.sorting_index]) for a in of_101
        }
        back = await identifiers.series_by_uid(list(real.series[s0].values()))
        assert {uid: e.acquisition_id for uid, e in back.items()} == {
            real.series[s0][a.sorting_index]: a.id for a in of_101
        }
        # alice cannot see the copy: its acquisitions are unknown to her.
        assert await identifiers.series_by_id([a.id for a in of_105]) == {}
        set_principal({}, principal(idp, "bob"))
        back = await identifiers.series_by_uid(list(real.series[s0].values()))
        assert {e.exam_id for e in back.values()} == {105}
        assert all(acquisitions[e.acquisition_id].examination_id == 105 for e in back.values())
    finally:
        await directory.aclose()


@pytest.mark.parametrize("mode", MODES)
async def test_a_copy_holds_only_its_own_acquisitions(
    mode: str,
    shanoir: ShanoirServer,
    orthanc: OrthancServer,
    idp: IdentityProvider,
    real: Archive,
    upstream: Upstream,
) -> None:
    s0 = real.studies[0]
    directory = shanoir_directory(settings_for(shanoir, orthanc, idp, **_mode(mode, idp)))
    identifiers = ShanoirIdentifierMap(directory, upstream)
    first = min(real.series[s0])
    try:
        set_principal({}, principal(idp, "admin"))
        own, alone = await identifiers.series_of_exam(105)
        assert set(own) == {real.series[s0][first]} and alone
        assert {e.exam_id for e in own.values()} == {105}
        own, alone = await identifiers.series_of_exam(101)
        assert set(own) == set(real.series[s0].values()) and not alone
    finally:
        await directory.aclose()


# --- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_shanoir_down_or_slow_is_503_without_its_words(
    mode: str, shanoir: ShanoirServer, orthanc: OrthancServer, idp: IdentityProvider
) -> None:
    world = shanoir.world
    for fault in ("down", "slow"):
        settings = settings_for(shanoir, orthanc, idp, timeout=0.5, **_mode(mode, idp))
        directory = shanoir_directory(settings)
        world.down, world.delay = fault == "down", 1.0 if fault == "slow" else 0.0
        try:
            with pytest.raises(ShanoirUnavailable) as caught:
                await ShanoirAccessPolicy(directory).visible(principal(idp, "alice"), "read")
        finally:
            world.down, world.delay = False, 0.0
            await directory.aclose()
        assert caught.value.status == 503
        assert "java" not in caught.value.detail and "Internal" not in caught.value.detail


# --- through a proxy: the front end's links, and every byte public ------------------------


@pytest.fixture(scope="module")
def gateway(
    shanoir: ShanoirServer,
    orthanc: OrthancServer,
    idp: IdentityProvider,
    proxy_factory: ProxyFactory,
) -> ProxyServer:
    """A proxy with both backends on this Shanoir, forwarding each caller's token."""
    return proxy_factory(
        orthanc.dicomweb_url,
        auth={"enabled": True, "issuer": idp.issuer, "audience": ["dicomweb-proxy"]},
        mapping={"backend": "shanoir", "study_root": ROOT, "series_root": ROOT},
        access={"backend": "shanoir"},
        shanoir={"url": shanoir.url},
    )


def _get(gateway: ProxyServer, idp: IdentityProvider, user: str, path: str) -> httpx.Response:
    token = idp.password_token(user)
    return httpx.get(
        gateway.dicomweb_url + path,
        headers={"authorization": f"Bearer {token}", "accept": "application/dicom+json"},
        timeout=30,
    )


def _studies(response: httpx.Response) -> set[str]:
    assert response.status_code == 200, response.text
    return {row["0020000D"]["Value"][0] for row in response.json()}


def test_each_caller_lists_the_examinations_shanoir_gives_them(
    gateway: ProxyServer, idp: IdentityProvider
) -> None:
    assert _studies(_get(gateway, idp, "alice", "/studies")) == {f"{ROOT}.101", f"{ROOT}.102"}
    # bob sees 101's study only as its copy 105, in study 20, centre 2.
    assert _studies(_get(gateway, idp, "bob", "/studies")) == {f"{ROOT}.103", f"{ROOT}.105"}
    # admin reads both the original and its copy: two studies, as Shanoir lists them.
    assert {f"{ROOT}.101", f"{ROOT}.102", f"{ROOT}.103", f"{ROOT}.105"} <= _studies(
        _get(gateway, idp, "admin", "/studies")
    )


def test_the_front_ends_viewer_links_open_through_the_proxy(
    gateway: ProxyServer, idp: IdentityProvider, shanoir: ShanoirServer, real: Archive
) -> None:
    """``viewer?StudyInstanceUIDs=<root>.<examId>&SeriesInstanceUIDs=<root>.<acqId>``: what OHIF
    asks for it answers, with the same root for the acquisition, and nothing real in it."""
    acquisition = next(a for a in shanoir.world.acquisitions if a.examination_id == 105)
    study, series = f"{ROOT}.105", f"{ROOT}.{acquisition.id}"
    listed = _get(gateway, idp, "bob", f"/studies/{study}/series")
    assert listed.status_code == 200
    assert series in {row["0020000E"]["Value"][0] for row in listed.json()}
    metadata = _get(gateway, idp, "bob", f"/studies/{study}/series/{series}/metadata")
    assert metadata.status_code == 200 and metadata.json()
    for row in metadata.json():
        assert row["0020000D"]["Value"] == [study] and row["0020000E"]["Value"] == [series]
    every_real = set(real.studies) | {uid for s in real.series.values() for uid in s.values()}
    for body in (listed.text, metadata.text):
        assert not [uid for uid in every_real if uid in body]


def test_what_shanoir_refuses_is_not_found(
    gateway: ProxyServer, idp: IdentityProvider, shanoir: ShanoirServer
) -> None:
    theirs = next(a for a in shanoir.world.acquisitions if a.examination_id == 103)
    for user, path in [
        ("alice", f"/studies/{ROOT}.103/metadata"),  # bob's centre
        ("alice", f"/studies/{ROOT}.105/series"),  # a copy in bob's centre
        ("bob", f"/studies/{ROOT}.101/metadata"),  # his row in study 10 is not confirmed
        # a series of another examination, under one alice may read
        ("alice", f"/studies/{ROOT}.102/series/{ROOT}.{theirs.id}/metadata"),
    ]:
        response = _get(gateway, idp, user, path)
        assert response.status_code == 404, (user, path, response.text)
        assert response.json()["code"] == "not_found"


def test_under_a_copy_only_its_acquisitions_show(
    gateway: ProxyServer, idp: IdentityProvider, shanoir: ShanoirServer, real: Archive
) -> None:
    """Exam 105 copies only the first series of its real study: whoever asks (bob, who may read
    only the copy, or admin, who may read both), the copy shows that series alone, on searches,
    metadata and retrieves, and no other series of the study, public or real."""
    s0 = real.studies[0]
    others = [uid for number, uid in real.series[s0].items() if number != min(real.series[s0])]
    copied = [a for a in shanoir.world.acquisitions if a.examination_id == 105]
    original = [a for a in shanoir.world.acquisitions if a.examination_id == 101]
    assert len(copied) == 1 and len(original) == len(real.series[s0]) > 1
    for user in ("bob", "admin"):
        listed = _get(gateway, idp, user, f"/studies/{ROOT}.105/series")
        assert [row["0020000E"]["Value"][0] for row in listed.json()] == [f"{ROOT}.{copied[0].id}"]
        metadata = _get(gateway, idp, user, f"/studies/{ROOT}.105/metadata")
        assert metadata.status_code == 200
        assert {row["0020000E"]["Value"][0] for row in metadata.json()} == {
            f"{ROOT}.{copied[0].id}"
        }
        token = idp.password_token(user)
        retrieved = httpx.get(
            gateway.dicomweb_url + f"/studies/{ROOT}.105",
            headers={"authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert retrieved.status_code == 200
        assert f"{ROOT}.{copied[0].id}".encode() in retrieved.content  # its instances, public
        for body in (listed.content, metadata.content, retrieved.content):
            assert not [uid for uid in [s0, *others] if uid.encode() in body]
            assert not [a for a in original if f"{ROOT}.{a.id}".encode() in body]
    # The original shows every acquisition.
    listed = _get(gateway, idp, "admin", f"/studies/{ROOT}.101/series")
    assert {row["0020000E"]["Value"][0] for row in listed.json()} == {
        f"{ROOT}.{a.id}" for a in original
    }


def test_readiness_and_check_probe_shanoir(
    gateway: ProxyServer, shanoir: ShanoirServer, tmp_path: Path
) -> None:
    ready = httpx.get(gateway.url + "/readyz", timeout=10)
    assert ready.status_code == 200
    assert ready.json()["checks"]["shanoir"]["ok"] is True
    shanoir.world.down = True
    try:
        time.sleep(1.1)  # past the reuse of the last readiness answer
        ready = httpx.get(gateway.url + "/readyz", timeout=10)
        checked = subprocess.run(
            [
                sys.executable,
                "-m",
                "shanoir_dicomweb_proxy",
                "check",
                "-c",
                str(gateway.config_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        shanoir.world.down = False
    assert ready.status_code == 503
    assert ready.json()["checks"]["shanoir"] == {
        "ok": False,
        "detail": "GET /studies/api-docs answered 500",
        "duration_ms": ready.json()["checks"]["shanoir"]["duration_ms"],
    }
    assert checked.returncode == 1, checked.stdout
    assert "FAIL  shanoir   GET /studies/api-docs answered 500" in checked.stdout
    assert "Traceback" not in checked.stdout + checked.stderr


def test_a_copy_shows_its_own_subjects_name(
    gateway: ProxyServer, idp: IdentityProvider, real: Archive
) -> None:
    """As Shanoir does: PatientName and PatientID of a copied examination are its subject's
    name, in searches, metadata (JSON and XML) and Part 10; the original keeps the PACS's."""
    s0, s2 = real.studies[0], real.studies[2]
    pacs_name = real.names[s0].encode()
    token = idp.password_token("bob")
    auth = {"authorization": f"Bearer {token}"}
    rows = httpx.get(
        gateway.dicomweb_url + "/studies",
        params={"includefield": "00100010,00100020"},
        headers={**auth, "accept": "application/dicom+json"},
        timeout=30,
    ).json()
    by_study = {row["0020000D"]["Value"][0]: row for row in rows}
    copy = by_study[f"{ROOT}.105"]
    assert copy["00100010"]["Value"] == [{"Alphabetic": "Subject-11"}]
    assert copy["00100020"]["Value"] == ["Subject-11"]
    original = by_study[f"{ROOT}.103"]  # not a copy: the PACS's name
    assert original["00100010"]["Value"] == [{"Alphabetic": real.names[s2]}]
    metadata = _get(gateway, idp, "bob", f"/studies/{ROOT}.105/metadata")
    assert {row["00100010"]["Value"][0]["Alphabetic"] for row in metadata.json()} == {"Subject-11"}
    xml = httpx.get(
        gateway.dicomweb_url + f"/studies/{ROOT}.105/metadata",
        headers={**auth, "accept": 'multipart/related; type="application/dicom+xml"'},
        timeout=30,
    )
    assert xml.status_code == 200 and b"<FamilyName>Subject-11</FamilyName>" in xml.content
    retrieved = httpx.get(gateway.dicomweb_url + f"/studies/{ROOT}.105", headers=auth, timeout=60)
    assert retrieved.status_code == 200
    instances = [pydicom.dcmread(io.BytesIO(body)) for _, body in parts(retrieved)]
    assert instances and {str(ds.PatientName) for ds in instances} == {"Subject-11"}
    assert {ds.PatientID for ds in instances} == {"Subject-11"}
    for body in (metadata.content, xml.content, retrieved.content):
        assert pacs_name not in body


async def test_the_service_probe_reads_the_matrix_and_counts_what_cannot_show(
    shanoir: ShanoirServer, orthanc: OrthancServer, idp: IdentityProvider
) -> None:
    directory = shanoir_directory(settings_for(shanoir, orthanc, idp, **service(idp)))
    try:
        result = await probe_shanoir(directory, within=5)
    finally:
        await directory.aclose()
    assert result.ok
    # Every examination, every row of every study, and 104, which has no StudyInstanceUID.
    assert (
        result.detail
        == "answers; 5 examinations, 4 rights; 1 without a StudyInstanceUID, not shown: 104"
    )


def test_a_copy_asked_for_by_its_uid_is_answered_as_the_copy(
    gateway: ProxyServer, idp: IdentityProvider
) -> None:
    """admin may read the original (101) and its copy (105), one real study: a search for the
    copy's UID answers the copy, one for the original's the original."""
    for exam in (101, 105):
        rows = _get(gateway, idp, "admin", f"/studies?StudyInstanceUID={ROOT}.{exam}").json()
        assert [row["0020000D"]["Value"][0] for row in rows] == [f"{ROOT}.{exam}"]


def test_copies_are_studies_of_their_own_at_the_root_and_page_exactly(
    gateway: ProxyServer, idp: IdentityProvider, real: Archive
) -> None:
    """One real study, two examinations (101 and its copy 105): a search at the root lists each
    as a study of its own, the copy with its subject's name; pages of one row concatenate to the
    whole list, each row once, Warning: 299 on all but the last page."""
    s0 = real.studies[0]
    token = idp.password_token("admin")
    headers = {"authorization": f"Bearer {token}", "accept": "application/dicom+json"}
    url = gateway.dicomweb_url + "/studies"
    query = {"includefield": "00100010", "StudyDate": "19000101-29991231"}
    whole = httpx.get(url, params=query, headers=headers, timeout=30).json()
    names = {row["0020000D"]["Value"][0]: row["00100010"]["Value"][0] for row in whole}
    assert names[f"{ROOT}.105"] == {"Alphabetic": "Subject-11"}
    assert names[f"{ROOT}.101"] == {"Alphabetic": real.names[s0]}
    paged: list[str] = []
    for offset in range(len(whole) + 1):
        page = httpx.get(
            url, params={**query, "limit": "1", "offset": str(offset)}, headers=headers, timeout=30
        )
        rows = page.json() if page.content else []
        paged += [row["0020000D"]["Value"][0] for row in rows]
        more = offset < len(whole) - 1
        assert ("warning" in page.headers) == more, (offset, page.headers.get("warning"))
    assert paged == [row["0020000D"]["Value"][0] for row in whole]
    assert len(set(paged)) == len(paged)
    # The same rows in DICOM XML, one part each, the copy with its subject's name.
    as_xml = {**headers, "accept": 'multipart/related; type="application/dicom+xml"'}
    answer = httpx.get(url, params=query, headers=as_xml, timeout=30)
    assert answer.status_code == 200
    bodies = {xml_value(body, STUDY_INSTANCE_UID): body for _, body in parts(answer)}
    assert list(bodies) == paged
    assert b"<FamilyName>Subject-11</FamilyName>" in bodies[f"{ROOT}.105"]
    assert b"Subject-11" not in bodies[f"{ROOT}.101"]


def _orthanc_file(orthanc: OrthancServer, study: str) -> tuple[str, bytes]:
    """An instance of ``study``, as Orthanc holds it: its Orthanc ID and its file."""
    with httpx.Client(base_url=orthanc.url, timeout=30) as http:
        query = {"Level": "Instance", "Query": {"StudyInstanceUID": study}}
        found = http.post("/tools/find", json=query).json()
        return found[0], http.get(f"/instances/{found[0]}/file").content


def test_an_upload_goes_where_shanoir_registers_it(
    gateway: ProxyServer,
    idp: IdentityProvider,
    shanoir: ShanoirServer,
    real: Archive,
    orthanc: OrthancServer,
) -> None:
    """A viewer's SEG on examination 102 (alice may import into it): checked for CAN_IMPORT,
    sent to Shanoir's own STOW route with alice's token, with the public study UID Shanoir
    reads to find the examination and the real UID of the series it refers to; Shanoir stores
    it; the viewer gets a PS3.18 answer. On 101 (no CAN_IMPORT), refused, nothing sent."""
    s1 = real.studies[1]
    acquisition = next(a for a in shanoir.world.acquisitions if a.examination_id == 102)
    referenced = real.series[s1][acquisition.sorting_index]
    _, template = _orthanc_file(orthanc, s1)
    seg = pydicom.dcmread(io.BytesIO(template))
    seg.StudyInstanceUID = f"{ROOT}.102"
    seg.SeriesInstanceUID = generate_uid()
    seg.SOPInstanceUID = seg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    item = Dataset()
    item.SeriesInstanceUID = f"{ROOT}.{acquisition.id}"  # as the viewer saw it
    seg.ReferencedSeriesSequence = Sequence([item])
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    boundary = "b0undary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + buffer.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {
        "authorization": f"Bearer {idp.password_token('alice')}",
        "content-type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "accept": "application/dicom+json",
    }
    world = shanoir.world
    before = len(world.uploads)
    stored = httpx.post(
        gateway.dicomweb_url + "/studies", content=body, headers=headers, timeout=60
    )
    try:
        assert stored.status_code == 200, stored.text
        answer = stored.json()
        (reference,) = answer["00081199"]["Value"]
        assert reference["00081155"]["Value"] == [seg.SOPInstanceUID]
        # The new series is no acquisition: its link is left out, and nothing real shows.
        assert s1 not in stored.text and referenced not in stored.text
        (user, received) = world.uploads[before]
        assert user == 1
        assert received.StudyInstanceUID == f"{ROOT}.102"
        assert received.ReferencedSeriesSequence[0].SeriesInstanceUID == referenced
        with httpx.Client(base_url=orthanc.dicomweb_url, timeout=30) as direct:
            rows = direct.get("/instances", params={"SOPInstanceUID": seg.SOPInstanceUID}).json()
        assert [row["0020000D"]["Value"][0] for row in rows] == [s1]
        # Refused where alice may not import: nothing reaches Shanoir.
        seg.StudyInstanceUID = f"{ROOT}.101"
        seg.SOPInstanceUID = seg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        seg.save_as(buffer, enforce_file_format=True)
        body = (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + buffer.getvalue()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        refused = httpx.post(
            gateway.dicomweb_url + "/studies", content=body, headers=headers, timeout=60
        )
        assert refused.status_code == 409
        failed = refused.json()["00081198"]["Value"][0]
        assert failed["00081197"]["Value"] == [0x0124]
        assert len(world.uploads) == before + 1
    finally:
        with httpx.Client(base_url=orthanc.url, timeout=30) as http:
            lookup = http.post("/tools/lookup", content=str(seg.SeriesInstanceUID)).json()
            for found in lookup:
                http.delete(f"/series/{found['ID']}")
