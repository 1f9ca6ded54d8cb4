"""Random users × random grants × the routes of the Studies Service: no byte of any answer names
an examination the caller may not read.

The proxy runs in process (``httpx.ASGITransport``) in front of the translation archive's
Orthanc, with the real token path (a local JWKS and dev tokens), the sqlite map on a copy of the
synced store, and an access policy whose grants each hypothesis example draws anew. Every
answer, headers and body (and any deflated Part 10 dataset inflated), is scanned for every real
study and series UID of the archive, and for the public study and series UIDs and the SOP
Instance UIDs of every examination the caller may not read. A route on an examination the
caller may not use answers exactly (status, headers, body) as the same route on an examination
that does not exist; a path whose series is not of its study, or whose instance is not of its
series, answers exactly as one naming a series or instance that does not exist.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection, Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc.jwk import RSAKey

from shanoir_dicomweb_proxy import DicomWebProxy, Settings
from shanoir_dicomweb_proxy._access import AccessPolicy, Action, Visible, grant_covers, user_key
from shanoir_dicomweb_proxy._auth import dev_token
from shanoir_dicomweb_proxy._identifiers import UidFormatter
from shanoir_dicomweb_proxy._scope import Principal
from shanoir_dicomweb_proxy._store import SqliteStore
from shanoir_dicomweb_proxy.testing import OrthancServer

from .support.archive import SERIES_ROOT, STUDY_ROOT
from .support.leaks import GHOST, Exam, Example, Series, World, in_process, random_route

USER = "tester"
#: A user whose name is the subject of one of the tester's tokens: with a userId claim, grants
#: name the user ID, so this user's grants are not the tester's.
DECOY = "s-" + USER
FORMAT = UidFormatter(STUDY_ROOT, SERIES_ROOT)
GRANTS: tuple[frozenset[Action], ...] = (
    frozenset({"read"}),
    frozenset({"download"}),
    frozenset({"read", "download"}),
)

# --- the archive as the test knows it ---------------------------------------------------------


class Grants:
    """An :class:`AccessPolicy` over user → {examination: actions}, which examples replace."""

    def __init__(self) -> None:
        self.grants: dict[str, dict[int, frozenset[Action]]] = {}

    async def visible(self, principal: Principal, action: Action) -> Visible:
        mine = self.grants.get(user_key(principal), {})
        return frozenset(
            exam for exam, actions in mine.items() if any(grant_covers(a, action) for a in actions)
        )

    async def allowed(
        self, principal: Principal, action: Action, exam_ids: Collection[int]
    ) -> frozenset[int]:
        visible = await self.visible(principal, action)
        assert isinstance(visible, frozenset)
        return visible.intersection(exam_ids)


def _archive(archive: OrthancServer, store: Path) -> dict[int, Exam]:
    """The examinations of the store, with their series and instances from Orthanc's REST API."""
    base = archive.dicomweb_url.rsplit("/dicom-web", 1)[0]
    with httpx.Client(base_url=base, timeout=60) as http:
        series_rows = http.get("/series", params={"expand": ""}).json()
        instance_rows = http.get("/instances", params={"expand": ""}).json()
    series_uid = {row["ID"]: row["MainDicomTags"]["SeriesInstanceUID"] for row in series_rows}
    instances: dict[str, list[str]] = {}
    for row in instance_rows:
        sop = row["MainDicomTags"]["SOPInstanceUID"]
        instances.setdefault(series_uid[row["ParentSeries"]], []).append(sop)
    with SqliteStore(store) as opened:
        entries = opened.entries()
    return {
        entry.exam_id: Exam(
            entry.exam_id,
            FORMAT.study_uid(entry.exam_id),
            entry.study_uid,
            tuple(
                Series(
                    FORMAT.series_uid(a.acquisition_id),
                    a.series_uid,
                    tuple(sorted(instances[a.series_uid])),
                )
                for a in entry.acquisitions
            ),
        )
        for entry in entries
    }


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    archive: OrthancServer,
    store_path: Path,
    real_uids: set[str],
) -> Iterator[tuple[World, Grants]]:
    folder = tmp_path_factory.mktemp("leaks")
    store = folder / "store.sqlite3"
    shutil.copy(store_path, store)
    keys = folder / "keys.json"
    key = RSAKey.generate_key(2048, parameters={"kid": "k"}, private=True)
    keys.write_text(json.dumps({"keys": [key.as_dict(private=True)]}))
    proxy_settings = Settings.from_dict(
        {
            "upstream": {"url": archive.dicomweb_url},
            "auth": {"enabled": True, "jwks_file": str(keys), "audience": ["dicomweb-proxy"]},
            "mapping": {"backend": "sqlite", "study_root": STUDY_ROOT, "series_root": SERIES_ROOT},
            "access": {"retrieve_action": "download"},  # read and download grants differ
            "logging": {"audit_log": ""},  # no audit file in the working directory
            "store": {"path": str(store)},
        }
    )
    exams = _archive(archive, store)
    assert len(exams) == 14 and all(e.series and e.exam_id < GHOST for e in exams.values())
    reals = {e.real for e in exams.values()} | {s.real for e in exams.values() for s in e.series}
    assert reals == real_uids  # the store maps every study and series of the archive
    policy = Grants()
    assert isinstance(policy, AccessPolicy)
    app = DicomWebProxy(proxy_settings, access=policy)
    # Two tokens for the same user: by its userId claim, and by its subject alone.
    tokens = (
        dev_token(proxy_settings, DECOY, {"userId": USER}, ttl=3600),
        dev_token(proxy_settings, USER, {}, ttl=3600),
    )
    with in_process(app) as (runner, client):
        yield World(runner, client, FORMAT, exams, tokens, frozenset(real_uids)), policy


# --- routes ------------------------------------------------------------------------------------


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@pytest.mark.slow
@given(data=st.data())
def test_no_answer_names_an_examination_not_granted(
    world: tuple[World, Grants], data: st.DataObject
) -> None:
    world, policy = world
    ids = sorted(world.exams)
    grants: dict[str, dict[int, frozenset[Action]]] = {}
    for user in (USER, DECOY, "other"):
        grants[user] = data.draw(
            st.dictionaries(st.sampled_from(ids), st.sampled_from(GRANTS), max_size=len(ids)),
            label=f"grants of {user}",
        )
    if data.draw(st.booleans(), label="a grant on an examination that does not exist"):
        grants[USER] = {**grants[USER], GHOST: GRANTS[2]}
    policy.grants = grants
    token = data.draw(st.sampled_from(world.tokens), label="token")
    readable = sorted(e for e in grants[USER] if e in world.exams)
    routes = data.draw(
        st.lists(random_route(world, readable), min_size=5, max_size=12), label="routes"
    )
    # Links found in the answers are re-fetched: these pick among them whatever they are.
    links = data.draw(st.lists(st.integers(0, 1000), max_size=3), label="links")
    mine = grants[USER]

    def may(exam: int | None, action: Action) -> bool:
        actions = mine.get(exam, frozenset()) if exam is not None else frozenset()
        return exam in world.exams and any(grant_covers(a, action) for a in actions)

    listed = frozenset(e for e in mine if e in world.exams)
    world.runner.run(Example(world, token, may, listed).run(routes, links))
