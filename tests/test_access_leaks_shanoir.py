"""Random Shanoir-NG rights × the routes of the Studies Service, through the ``shanoir``
backends: no byte of any answer names an examination the caller may not read, copies included.

The proxy runs in process in front of the translation archive's Orthanc, with the real token
path (a local JWKS), both backends on a loopback Shanoir API (``tests/support/shanoir.py``) that
each example gives new rights: for each of three research studies, the tester's row (rights,
confirmed or not, centres) and another user's. Examinations are the archive's studies, spread
over the research studies and two centres, with one acquisition per series of a unique
SeriesNumber, plus two copies (one of a single acquisition, one of all) and an examination
without a StudyInstanceUID. Both credential modes run: the caller's token forwarded, and the
proxy's own client reading every right. What the tester may do is Shanoir's rule; everything
else is the shared leak test (``tests/support/leaks.py``): every real UID, and every public UID
and instance of an examination the tester may not read, is searched for in every answer.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc.jwk import RSAKey

from shanoir_dicomweb_proxy import Action, DicomWebProxy, Settings, UidFormatter
from shanoir_dicomweb_proxy._auth import dev_token
from shanoir_dicomweb_proxy.testing import OrthancServer

from .support.idp import PROXY_CLIENT_ID, PROXY_CLIENT_SECRET, IdentityProvider
from .support.leaks import Exam, Example, Series, World, in_process, random_route
from .support.shanoir import (
    Acquisition,
    Caller,
    Examination,
    Member,
    ShanoirWorld,
    Study,
    serving,
)

ROOT = "1.4.9.12.34.1.8527"
FORMAT = UidFormatter(ROOT, ROOT)
ISSUER = "https://idp.test/realms/shanoir-ng"
#: The realm's service account (client credentials of dicomweb-proxy), given ROLE_ADMIN.
SERVICE_ACCOUNT = "00000000-0000-4000-8000-000000000100"
TESTER, OTHER = 1, 2
STUDIES = (1, 2, 3)
CENTERS = (1, 2)
#: The Shanoir right each action needs.
NEEDS: dict[Action, str] = {
    "read": "CAN_SEE_ALL",
    "download": "CAN_DOWNLOAD",
    "write": "CAN_IMPORT",
}


def _archive(archive: OrthancServer) -> dict[str, dict[int, tuple[str, tuple[str, ...]]]]:
    """Study UID → SeriesNumber → (series UID, its instances), for the series whose number is
    unique in their study (the others match no acquisition)."""
    base = archive.dicomweb_url.rsplit("/dicom-web", 1)[0]
    with httpx.Client(base_url=base, timeout=60) as http:
        studies = http.get("/studies", params={"expand": ""}).json()
        series_rows = http.get("/series", params={"expand": ""}).json()
        instance_rows = http.get("/instances", params={"expand": ""}).json()
    study_uid = {row["ID"]: row["MainDicomTags"]["StudyInstanceUID"] for row in studies}
    instances: dict[str, list[str]] = {}
    for row in instance_rows:
        instances.setdefault(row["ParentSeries"], []).append(row["MainDicomTags"]["SOPInstanceUID"])
    numbers: dict[str, dict[int, list[tuple[str, tuple[str, ...]]]]] = {}
    for row in series_rows:
        tags = row["MainDicomTags"]
        number = tags.get("SeriesNumber", "").strip()
        held = numbers.setdefault(study_uid[row["ParentStudy"]], {})
        if number.isdigit():
            entry = (tags["SeriesInstanceUID"], tuple(sorted(instances[row["ID"]])))
            held.setdefault(int(number), []).append(entry)
    return {
        study: {n: found[0] for n, found in by_number.items() if len(found) == 1}
        for study, by_number in numbers.items()
    }


def _examinations(
    real: dict[str, dict[int, tuple[str, tuple[str, ...]]]],
) -> tuple[list[Examination], list[Acquisition], dict[int, Exam]]:
    """Shanoir's examinations and acquisitions over the archive, and the same as the leak test
    knows them (public UIDs, real UIDs, instances)."""
    exams: list[Examination] = []
    acquisitions: list[Acquisition] = []
    known: dict[int, Exam] = {}
    next_acquisition = 5000

    def add(exam: Examination, numbers: list[int]) -> None:
        nonlocal next_acquisition
        exams.append(exam)
        series: list[Series] = []
        assert exam.study_instance_uid is not None
        for number in numbers:
            next_acquisition += 1
            acquisitions.append(Acquisition(next_acquisition, exam.id, number))
            uid, held = real[exam.study_instance_uid][number]
            series.append(Series(FORMAT.series_uid(next_acquisition), uid, held))
        known[exam.id] = Exam(
            exam.id, FORMAT.study_uid(exam.id), exam.study_instance_uid, tuple(series)
        )

    ordered = sorted(real)
    for index, uid in enumerate(ordered):
        study, center = STUDIES[index % 3], CENTERS[(index // 3) % 2]
        add(Examination(200 + index, study, center, index, f"S-{index}", uid), sorted(real[uid]))
    first, second = ordered[0], ordered[1]
    add(Examination(300, 2, 2, 90, "Copy-90", first, source=200), sorted(real[first])[:1])
    add(Examination(301, 3, 1, 91, "Copy-91", second, source=201), sorted(real[second]))
    exams.append(Examination(302, 1, 1, 92, "Legacy", None))  # no StudyInstanceUID
    return exams, acquisitions, known


class Rights:
    """What a drawn set of rows lets the tester do, by Shanoir's rule."""

    def __init__(self, rows: dict[int, Member], exams: list[Examination]) -> None:
        self.rows = rows
        self.exams = {e.id: e for e in exams}

    def may(self, exam_id: int | None, action: Action) -> bool:
        exam = self.exams.get(exam_id) if exam_id is not None else None
        row = self.rows.get(exam.study_id) if exam is not None else None
        return (
            exam is not None
            and row is not None
            and row.confirmed
            and NEEDS[action] in row.rights
            and (not row.center_ids or exam.center_id in row.center_ids)
        )

    def listed(self, known: dict[int, Exam]) -> frozenset[int]:
        """What a search at the root lists: every readable examination with a study, copies
        each as a study of its own."""
        return frozenset(e for e in self.exams if e in known and self.may(e, "read"))


@pytest.fixture(scope="module", params=["user", "service"])
def world(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    archive: OrthancServer,
    real_uids: set[str],
) -> Iterator[tuple[World, ShanoirWorld]]:
    """The proxy in process on a loopback Shanoir; with ``credentials = "service"``, the proxy's
    own client gets its token from the tests' OpenID provider, whose service account Shanoir
    treats as an admin, and the tester's tokens are signed with a local key of the same realm."""
    folder = tmp_path_factory.mktemp("shanoir-leaks")
    key = RSAKey.generate_key(2048, parameters={"kid": "k"}, private=True)
    keys = folder / "keys.json"
    keys.write_text(json.dumps({"keys": [key.as_dict(private=True)]}))
    exams, acquisitions, known = _examinations(_archive(archive))
    with contextlib.ExitStack() as stack:
        realm: dict[str, Any] = {"keys": [key.as_dict(private=False)]}
        shanoir_settings: dict[str, Any] = {"credentials": "user"}
        issuer = ISSUER
        if request.param == "service":
            idp = stack.enter_context(IdentityProvider(folder / "idp"))
            issuer = idp.issuer
            realm["keys"] += idp.public_jwks()["keys"]
            shanoir_settings = {
                "credentials": "service",
                "service": {
                    "token_url": idp.token_url,
                    "client_id": PROXY_CLIENT_ID,
                    "client_secret": PROXY_CLIENT_SECRET,
                },
            }
        shanoir = ShanoirWorld(
            issuer=issuer,
            jwks=realm,
            examinations=exams,
            acquisitions=acquisitions,
            admins={SERVICE_ACCOUNT},
        )
        server = stack.enter_context(serving(shanoir))
        proxy_settings = Settings.from_dict(
            {
                "upstream": {"url": archive.dicomweb_url},
                "auth": {"jwks_file": str(keys), "issuer": issuer},
                "mapping": {
                    "backend": "shanoir",
                    "study_root": ROOT,
                    "series_root": ROOT,
                    "unmapped_series": "hide",
                },
                "access": {"backend": "shanoir", "retrieve_action": "download", "cache_ttl": 0},
                "shanoir": {"url": server.url, "cache_ttl": 0, **shanoir_settings},
                "logging": {"audit_log": ""},
            }
        )
        app = DicomWebProxy(proxy_settings)
        roles: dict[str, Any] = {"realm_access": {"roles": ["ROLE_USER"]}}
        tokens = (dev_token(proxy_settings, "tester", {"userId": TESTER, **roles}, ttl=3600),)
        runner, client = stack.enter_context(in_process(app))
        yield World(runner, client, FORMAT, known, tokens, frozenset(real_uids)), shanoir


@st.composite
def _row(draw: st.DrawFn, user: int) -> Member | None:
    if draw(st.integers(0, 3)) == 0:
        return None
    rights = draw(st.sets(st.sampled_from(["CAN_SEE_ALL", "CAN_DOWNLOAD", "CAN_IMPORT"])))
    if draw(st.integers(0, 2)):
        rights.add("CAN_SEE_ALL")  # mostly readable: most examples then have something to read
    return Member(
        user,
        tuple(sorted(rights)),
        confirmed=draw(st.integers(0, 4)) > 0,
        center_ids=tuple(sorted(draw(st.sets(st.sampled_from(CENTERS))))),
    )


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@pytest.mark.slow
@given(data=st.data())
def test_no_answer_names_an_examination_shanoir_does_not_show(
    world: tuple[World, ShanoirWorld], data: st.DataObject
) -> None:
    leaks, shanoir = world
    mine: dict[int, Member] = {}
    studies = []
    for study_id in STUDIES:
        members = []
        for user in (TESTER, OTHER):
            row = data.draw(_row(user), label=f"row of user {user} in study {study_id}")
            if row is not None:
                members.append(row)
                if user == TESTER:
                    mine[study_id] = row
        studies.append(Study(study_id, f"study {study_id}", members))
    with shanoir.lock:
        shanoir.studies = studies
    rights = Rights(mine, shanoir.examinations)
    readable = sorted(e for e in leaks.exams if rights.may(e, "read"))
    routes = data.draw(
        st.lists(random_route(leaks, readable), min_size=5, max_size=10), label="routes"
    )
    links = data.draw(st.lists(st.integers(0, 1000), max_size=3), label="links")
    example = Example(leaks, leaks.tokens[0], rights.may, rights.listed(leaks.exams))
    leaks.runner.run(example.run(routes, links))


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_the_examples_rule_is_the_loopback_shanoirs(
    world: tuple[World, ShanoirWorld], data: st.DataObject
) -> None:
    """The rule the leak test expects and the loopback Shanoir's own (``ShanoirWorld.allowed``,
    written from SHANOIR.md) agree on every examination and action."""
    _, shanoir = world
    rows = {s: row for s in STUDIES if (row := data.draw(_row(TESTER))) is not None}
    rights = Rights(rows, shanoir.examinations)
    studies = [Study(s, "", [rows[s]] if s in rows else []) for s in STUDIES]
    loopback = ShanoirWorld(issuer=ISSUER, jwks={}, studies=studies)
    caller = Caller(TESTER, frozenset({"ROLE_USER"}))
    for exam in shanoir.examinations:
        for action, right in NEEDS.items():
            assert rights.may(exam.id, action) == loopback.allowed(caller, exam, right)
