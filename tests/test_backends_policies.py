"""Access policies: grants in the embedded store (schema v2, store grant|revoke|list|import),
the static file, the http contract (against a real loopback server), the cache, and
build_access_policy for each [access] backend."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from shanoir_dicomweb_proxy import Principal
from shanoir_dicomweb_proxy._access import ALL, AccessPolicy, Action, AllowAll, Visible, user_key
from shanoir_dicomweb_proxy._backends import (
    CachingAccessPolicy,
    HttpAccessPolicy,
    ManagedAccessPolicy,
    SqliteAccessPolicy,
    StaticAccessPolicy,
    build_access_policy,
)
from shanoir_dicomweb_proxy._cli import main
from shanoir_dicomweb_proxy._config import AccessSettings, Settings
from shanoir_dicomweb_proxy._errors import AccessUnavailable, ConfigError, ProxyError
from shanoir_dicomweb_proxy._store import (
    Grant,
    ImportGrant,
    ImportRow,
    SqliteStore,
    StoreError,
    load_import,
)
from shanoir_dicomweb_proxy._store._sqlite import _APPLICATION_ID, _MIGRATIONS
from shanoir_dicomweb_proxy.testing import dump_toml, free_port

from .support.loopback_http import FakePlatform, LoopbackServer, serving

STUDY_ROOT, SERIES_ROOT = "1.4.9.12.34.1.8527", "1.4.9.12.34.2.8527"
NOW = 1_800_000_000.0


def _uid(n: int) -> str:
    return f"1.2.3.{n}"


def principal(
    user_id: str | None = "7",
    *,
    subject: str = "sub-alice",
    expires_at: float | None = None,
    roles: Collection[str] = ("ROLE_USER",),
) -> Principal:
    return Principal(
        subject=subject,
        user_id=user_id,
        username="alice",
        roles=frozenset(roles),
        claims={"sub": subject, "userId": user_id, "secret": "never sent"},
        expires_at=expires_at,
        is_admin=False,
        token_id="0123456789abcdef",
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    """Examinations 1 to 4."""
    with SqliteStore(tmp_path / "store.sqlite3") as store:
        for n in range(1, 5):
            store.register_study(_uid(n))
        yield store


# --- the store: schema v2 ---------------------------------------------------------------------


def test_v1_store_migrates_to_v2(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite3"
    conn = sqlite3.connect(path)
    for statement in _MIGRATIONS[0]:  # what version 1 wrote
        conn.execute(statement)
    conn.execute("INSERT INTO examinations (exam_id, study_uid) VALUES (5, '1.2.3.5')")
    conn.execute("INSERT INTO acquisitions (exam_id, series_uid) VALUES (5, '1.2.3.5.1')")
    conn.execute("PRAGMA user_version = 1")
    conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
    conn.commit()
    conn.close()
    with SqliteStore(path) as store:
        assert store.schema_version == 2
        assert [(e.exam_id, e.study_uid, len(e.acquisitions)) for e in store.entries()] == [
            (5, "1.2.3.5", 1)
        ]
        assert store.grants() == []
        assert store.grant("7", 5, "read") is True
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    columns = [row[1] for row in conn.execute("PRAGMA table_info(grants)")]
    assert columns == ["user", "exam_id", "action"]
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint"):
        conn.execute("INSERT INTO grants VALUES ('7', 5, 'delete')")
    conn.close()


def test_grant_revoke_visible_allowed(store: SqliteStore) -> None:
    assert store.grant("7", 1, "download") is True
    assert store.grant("7", 1, "download") is False  # idempotent
    assert store.grant("7", 2, "read") is True
    assert store.grant("7", 3, "write") is True
    assert store.grant("sub-bob", 4, "read") is True
    # download gives read; read gives nothing else; write gives only write
    assert store.visible_exams("7", "read") == {1, 2}
    assert store.visible_exams("7", "download") == {1}
    assert store.visible_exams("7", "write") == {3}
    assert store.visible_exams("8", "read") == set()
    assert store.allowed_exams("7", "read", [1, 2, 3, 4, 99, 0, 2**70]) == {1, 2}
    assert store.allowed_exams("7", "download", [2, 3]) == set()
    assert store.allowed_exams("sub-bob", "read", []) == set()
    assert store.grants("7") == [
        Grant("7", 1, "download"),
        Grant("7", 2, "read"),
        Grant("7", 3, "write"),
    ]
    assert [g.user for g in store.grants()] == ["7", "7", "7", "sub-bob"]
    # revoking read leaves the download grant, which still allows read
    assert store.revoke("7", 1, "read") is False
    assert store.allowed_exams("7", "read", [1]) == {1}
    assert store.revoke("7", 1, "download") is True
    assert store.revoke("7", 1, "download") is False
    assert store.visible_exams("7", "read") == {2}


def test_allowed_in_chunks(store: SqliteStore) -> None:
    for n in range(5, 1300):
        store.register_study(_uid(n))
    for exam_id in (3, 700, 1299):
        store.grant("7", exam_id, "read")
    assert store.allowed_exams("7", "read", range(1, 2000)) == {3, 700, 1299}


@pytest.mark.parametrize(
    ("user", "exam_id", "action", "message"),
    [
        ("7", 99, "read", "examination 99 is not in the store (store sync or store import"),
        ("", 1, "read", "user: expected a user ID or subject (not empty, no surrounding spaces)"),
        (" 7", 1, "read", "user: expected a user ID or subject"),
        (7, 1, "read", "user: expected a user ID or subject"),
        ("7", 0, "read", "exam_id: expected a positive integer, got 0"),
        ("7", "1", "read", "exam_id: expected a positive integer, got '1'"),
        ("7", 1, "delete", "action: expected one of read, download, write, got 'delete'"),
    ],
)
def test_grant_refused(
    store: SqliteStore, user: Any, exam_id: Any, action: Any, message: str
) -> None:
    with pytest.raises(StoreError) as info:
        store.grant(user, exam_id, action)
    assert str(info.value).startswith(message)
    assert store.grants() == []


def test_entries_show_grants(store: SqliteStore) -> None:
    store.grant("8", 2, "write")
    store.grant("7", 2, "read")
    store.grant("7", 2, "download")
    entries = store.entries()
    assert entries[0].grants == ()
    assert entries[1].grants == (
        Grant("7", 2, "download"),
        Grant("7", 2, "read"),
        Grant("8", 2, "write"),
    )


def test_import_grants(store: SqliteStore) -> None:
    rows = [ImportRow(10, _uid(10))]
    grants = [
        ImportGrant("7", 10, "read"),
        ImportGrant("7", 1, "write"),
        ImportGrant("7", 1, "write"),
    ]
    summary = store.import_entries(rows, grants)
    assert (summary.rows, summary.new_studies, summary.new_grants) == (1, 1, 2)
    assert store.visible_exams("7", "read") == {10}
    before = store.grants()
    with pytest.raises(StoreError, match=r"^item 3, grant 1: examination 11 is not in the store"):
        store.import_entries(
            [ImportRow(12, _uid(12))], [ImportGrant("9", 11, "read", where="item 3, grant 1")]
        )
    assert store.grants() == before  # all or nothing
    assert store.lookup_studies_by_id([12]) == {}


def test_load_import_reads_grants(tmp_path: Path) -> None:
    path = tmp_path / "export.json"
    items = [
        {
            "exam_id": 1,
            "study_uid": _uid(1),
            "acquisitions": [],
            "grants": [{"user": "7", "action": "read"}],
        },
        {"exam_id": 2, "study_uid": _uid(2), "grants": [{"user": "8", "action": "download"}]},
        {"exam_id": 3, "study_uid": _uid(3)},  # the flat form still works
    ]
    path.write_text(json.dumps(items, indent=1))
    data = load_import(path)
    assert [(r.exam_id, r.study_uid) for r in data.rows] == [
        (1, _uid(1)),
        (2, _uid(2)),
        (3, _uid(3)),
    ]
    assert [(g.user, g.exam_id, g.action) for g in data.grants] == [
        ("7", 1, "read"),
        ("8", 2, "download"),
    ]
    assert data.grants[1].where == "item 2 (line 13), grant 1"


@pytest.mark.parametrize(
    ("grants", "message"),
    [
        ([{"user": "7", "action": "erase"}], "item 1 (line 1), grant 1: action: expected one of"),
        ([{"user": "", "action": "read"}], "item 1 (line 1), grant 1: user: expected a user ID"),
        (
            [{"user": "7", "action": "read", "x": 1}],
            "item 1 (line 1), grant 1: unknown key 'x' (expected action, user)",
        ),
        (["7"], "item 1 (line 1), grant 1: expected an object"),
        ({"user": "7"}, "item 1 (line 1): grants: expected an array"),
    ],
)
def test_load_import_grant_errors(tmp_path: Path, grants: Any, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"exam_id": 1, "study_uid": _uid(1), "grants": grants}]))
    with pytest.raises(StoreError) as info:
        load_import(path)
    assert str(info.value).startswith(f"{path}: {message}")


# --- the command line -------------------------------------------------------------------------


def _config(folder: Path, store: str = "store.sqlite3") -> Path:
    settings = {
        "upstream": {"url": f"http://127.0.0.1:{free_port()}/dicom-web"},
        "auth": {"enabled": False},
        "mapping": {"backend": "sqlite", "study_root": STUDY_ROOT, "series_root": SERIES_ROOT},
        "store": {"path": store},
    }
    path = folder / "proxy.toml"
    path.write_text(dump_toml(settings))
    return path


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(["store", *args])
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A settings file whose store holds examinations 1 and 2 (2 with an acquisition)."""
    path = _config(tmp_path)
    with SqliteStore(tmp_path / "store.sqlite3") as store:
        store.register_study(_uid(1))
        store.register("1.2.3.2", ["1.2.3.2.1"])
    return path


def test_cli_grant_revoke_list(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = str(config)
    assert _cli(
        capsys, "grant", "-c", c, "--user", "7", "--study", "2", "--action", "download"
    ) == (
        0,
        "granted: user 7 may download examination 2\n",
        "",
    )
    code, out, _ = _cli(
        capsys, "grant", "-c", c, "--user", "7", "--study", "2", "--action", "download"
    )
    assert (code, out) == (0, "unchanged: user 7 may already download examination 2\n")
    assert (
        _cli(capsys, "grant", "-c", c, "--user", "sub-bob", "--study", "1", "--action", "write")[0]
        == 0
    )
    code, out, _ = _cli(capsys, "list", "-c", c)
    assert code == 0
    assert out.splitlines() == [
        f"examination 1  study 1.2.3.1  public {STUDY_ROOT}.1",
        "  grant write  user sub-bob",
        f"examination 2  study 1.2.3.2  public {STUDY_ROOT}.2",
        f"  acquisition 1  series 1.2.3.2.1  public {SERIES_ROOT}.1",
        "  grant download  user 7",
        "2 examinations, 1 acquisitions, 2 grants",
    ]
    code, out, _ = _cli(capsys, "list", "-c", c, "--json")
    listing = json.loads(out)
    assert [e["grants"] for e in listing] == [
        [{"user": "sub-bob", "action": "write"}],
        [{"user": "7", "action": "download"}],
    ]
    # revoking read leaves download, which still allows read: said so
    code, out, _ = _cli(
        capsys, "revoke", "-c", c, "--user", "7", "--study", "2", "--action", "read"
    )
    assert (code, out) == (
        0,
        "unchanged: user 7 has no read grant on examination 2 (but a download grant still "
        "lets them read it)\n",
    )
    code, out, _ = _cli(
        capsys, "revoke", "-c", c, "--user", "7", "--study", "2", "--action", "download"
    )
    assert (code, out) == (0, "revoked: user 7 may no longer download examination 2\n")
    code, out, _ = _cli(capsys, "list", "-c", c)
    assert "grant download" not in out and out.endswith(
        "2 examinations, 1 acquisitions, 1 grants\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user", "", "--study", "1", "--action", "read"], "error: user: expected a user ID"),
        (
            ["--user", "7", "--study", "abc", "--action", "read"],
            "argument --study: expected an examination ID (a positive integer), got 'abc'",
        ),
        (
            ["--user", "7", "--study", "0", "--action", "read"],
            "argument --study: expected an examination ID (a positive integer), got '0'",
        ),
        (
            ["--user", "7", "--study", "1", "--action", "delete"],
            "argument --action: invalid choice",
        ),
        (["--study", "1", "--action", "read"], "the following arguments are required: --user"),
    ],
)
@pytest.mark.parametrize("command", ["grant", "revoke"])
def test_cli_bad_input(
    config: Path, capsys: pytest.CaptureFixture[str], command: str, args: list[str], message: str
) -> None:
    code, out, err = _cli(capsys, command, "-c", str(config), *args)
    assert code == 2
    assert message in err and out == ""
    assert "Traceback" not in err


def test_cli_unknown_examination(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["-c", str(config), "--user", "7", "--study", "99", "--action", "read"]
    assert _cli(capsys, "grant", *args) == (
        2,
        "",
        "error: examination 99 is not in the store (store sync or store import registers it "
        "first)\n",
    )
    # nothing to revoke is not an error
    assert _cli(capsys, "revoke", *args) == (
        0,
        "unchanged: user 7 has no read grant on examination 99\n",
        "",
    )


def test_cli_grant_without_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, store="missing.sqlite3")
    code, _, err = _cli(
        capsys, "grant", "-c", str(config), "--user", "7", "--study", "1", "--action", "read"
    )
    assert code == 2 and "missing.sqlite3: no store there" in err
    assert not (tmp_path / "missing.sqlite3").exists()


def test_cli_list_import_round_trip_carries_grants(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = str(config)
    for user, exam, action in (("7", "1", "read"), ("7", "2", "write"), ("8", "2", "download")):
        assert (
            _cli(capsys, "grant", "-c", c, "--user", user, "--study", exam, "--action", action)[0]
            == 0
        )
    code, out, _ = _cli(capsys, "list", "-c", c, "--json")
    export = tmp_path / "export.json"
    export.write_text(out)
    (tmp_path / "copy").mkdir()
    copy = _config(tmp_path / "copy", store="copy.sqlite3")
    code, out, err = _cli(capsys, "import", "-c", str(copy), str(export))
    assert (code, err) == (0, "")
    assert out == "3 rows: 2 new examinations, 1 new acquisitions, 3 new grants\n"
    assert (
        _cli(capsys, "list", "-c", str(copy), "--json")[1]
        == _cli(capsys, "list", "-c", c, "--json")[1]
    )
    code, out, _ = _cli(capsys, "import", "-c", str(copy), str(export))  # again: nothing new
    assert out == "3 rows: 0 new examinations, 0 new acquisitions, 0 new grants\n"


def test_cli_import_without_grants_says_nothing_of_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    export = tmp_path / "rows.csv"
    export.write_text("exam_id,study_uid,acquisition_id,series_uid\n3,1.2.3.3,,\n")
    assert _cli(capsys, "import", "-c", str(config), str(export))[1] == (
        "1 rows: 1 new examinations, 0 new acquisitions\n"
    )
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            [
                {"exam_id": 4, "study_uid": _uid(4), "grants": [{"user": "7", "action": "read"}]},
                {
                    "exam_id": 5,
                    "study_uid": _uid(5),
                    "grants": [{"user": "7", "action": "read"}, {"user": "7", "action": "fly"}],
                },
            ]
        )
    )
    code, out, err = _cli(capsys, "import", "-c", str(config), str(bad))
    assert code == 2 and out == ""
    assert err == (
        f"error: {bad}: item 2 (line 1), grant 2: action: expected one of read, download, write, "
        "got 'fly'\n"
    )
    with SqliteStore(tmp_path / "store.sqlite3") as store:
        assert store.grants() == [] and store.lookup_studies_by_id([4]) == {}


# --- the sqlite policy ------------------------------------------------------------------------


async def test_sqlite_policy(store: SqliteStore) -> None:
    store.grant("7", 1, "download")
    store.grant("sub-bob", 2, "read")
    policy = SqliteAccessPolicy(store)
    assert isinstance(policy, AccessPolicy)
    assert await policy.visible(principal("7"), "read") == frozenset({1})
    assert await policy.visible(principal("7"), "write") == frozenset()
    # without a user ID, the subject names the user
    bob = principal(None, subject="sub-bob")
    assert user_key(bob) == "sub-bob" and user_key(principal("7", subject="sub-bob")) == "7"
    assert await policy.visible(bob, "read") == frozenset({2})
    assert await policy.allowed(bob, "read", [1, 2, 3]) == frozenset({2})
    assert await policy.allowed(principal("7"), "download", []) == frozenset()
    store.close()
    with pytest.raises(AccessUnavailable) as info:
        await policy.visible(principal("7"), "read")
    assert (info.value.status, info.value.code) == (503, "access_unavailable")


# --- the static policy ------------------------------------------------------------------------

STATIC_TOML = """\
[[grants]]
user = "7"
exams = [1, 2]
actions = ["read"]

[[grants]]
user = "7"
exams = [3]
actions = ["download", "write"]

[[grants]]
user = "sub-admin"
all = true
actions = ["read"]

[[grants]]
user = "9"
exams = []
actions = ["write"]
"""


async def check_static(policy: StaticAccessPolicy) -> None:
    seven = principal("7")
    assert await policy.visible(seven, "read") == frozenset({1, 2, 3})  # download gives read
    assert await policy.visible(seven, "download") == frozenset({3})
    assert await policy.visible(seven, "write") == frozenset({3})
    admin = principal(None, subject="sub-admin")
    assert await policy.visible(admin, "read") is ALL
    assert await policy.visible(admin, "download") == frozenset()
    assert await policy.allowed(admin, "read", [5, 6]) == frozenset({5, 6})
    assert await policy.allowed(seven, "read", [2, 3, 4]) == frozenset({2, 3})
    assert await policy.visible(principal("9"), "write") == frozenset()
    assert await policy.visible(principal("10"), "read") == frozenset()


async def test_static_from_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "grants.toml"
    toml.write_text(STATIC_TOML)
    policy = StaticAccessPolicy.from_file(toml)
    await check_static(policy)
    assert repr(policy) == f"StaticAccessPolicy({str(toml)!r}, 3 users)"
    data = {
        "grants": [
            {"user": "7", "exams": [1, 2], "actions": ["read"]},
            {"user": "7", "exams": [3], "actions": ["download", "write"]},
            {"user": "sub-admin", "all": True, "actions": ["read"]},
            {"user": "9", "exams": [], "actions": ["write"], "all": False},
        ]
    }
    path = tmp_path / "grants.json"
    path.write_text(json.dumps(data), encoding="utf-8-sig")
    await check_static(StaticAccessPolicy.from_file(path))


async def test_static_all_wins_over_a_list(tmp_path: Path) -> None:
    path = tmp_path / "grants.json"
    grants = [
        {"user": "7", "exams": [1], "actions": ["read"]},
        {"user": "7", "all": True, "actions": ["read"]},
        {"user": "7", "exams": [2], "actions": ["read"]},
    ]
    path.write_text(json.dumps({"grants": grants}))
    assert await StaticAccessPolicy.from_file(path).visible(principal("7"), "read") is ALL


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[grants]]\nuser = 7\nexams = [1]\nactions = ["read"]\n',
            'item 1: user: expected a user ID or subject as a string (user = "7"), got 7',
        ),
        (
            '[[grants]]\nuser = "7"\nexams = [1]\nactions = ["reed"]\n',
            "item 1: actions: expected a list of read, download, write, got ['reed']",
        ),
        (
            '[[grants]]\nuser = "7"\nexams = [1]\nactions = []\n',
            "item 1: actions: expected a list of read, download, write, got []",
        ),
        (
            '[[grants]]\nuser = "7"\nexams = [1]\n',
            "item 1: actions: expected a list of read, download, write, got None",
        ),
        (
            '[[grants]]\nuser = "7"\nactions = ["read"]\n',
            "item 1: expected either exams (a list of IDs) or all = true",
        ),
        (
            '[[grants]]\nuser = "7"\nexams = [1]\nall = true\nactions = ["read"]\n',
            "item 1: expected either exams (a list of IDs) or all = true",
        ),
        (
            '[[grants]]\nuser = "7"\nall = "yes"\nactions = ["read"]\n',
            "item 1: all: expected true or false, got 'yes'",
        ),
        (
            '[[grants]]\nuser = "7"\nexams = [0]\nactions = ["read"]\n',
            "item 1: exams: expected a positive integer, got 0",
        ),
        (
            '[[grants]]\nuser = "7"\nexams = 1\nactions = ["read"]\n',
            "item 1: exams: expected a list of examination IDs, got 1",
        ),
        (
            '[[grants]]\nuser = "7"\nexam = [1]\nactions = ["read"]\n',
            "item 1: unknown key 'exam' (expected actions, all, exams, user)",
        ),
        ("grant = []\n", "top level: unknown key 'grant' (expected grants)"),
        ('grants = "7"\n', "grants: expected an array of grants"),
        ("grants = [1]\n", "item 1: expected a grant (user, actions, exams or all)"),
        ("grants = [\n", "invalid TOML: "),
    ],
)
def test_static_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "grants.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        StaticAccessPolicy.from_file(path)
    assert str(info.value).startswith(f"{path}: {expected}")


def test_static_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read: No such file"):
        StaticAccessPolicy.from_file(tmp_path / "missing.toml")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"list\.json: expected an object with a 'grants' array"):
        StaticAccessPolicy.from_file(tmp_path / "list.json")
    (tmp_path / "bad.json").write_text('{"grants": [}')
    with pytest.raises(ConfigError, match=r"bad\.json: line 1 column 13: Expecting value"):
        StaticAccessPolicy.from_file(tmp_path / "bad.json")


# --- the http policy: a platform implementing the contract --------------------------------------


@dataclass
class AccessPlatform(FakePlatform):
    """Grants by user ID (or subject): examination IDs, or "all"."""

    paths = frozenset({"/api/access/visible", "/api/access/allowed"})

    grants: dict[tuple[str, str], Any] = field(
        default_factory=lambda: {("7", "read"): [1, 2, 3], ("sub-admin", "read"): "all"}
    )
    extra: list[Any] = field(default_factory=list)  # added to every list of IDs

    def answer(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        user = body["user"]["id"] or body["user"]["subject"]
        granted = self.grants.get((user, body["action"]), [])
        if path == "/api/access/visible":
            if granted == "all":
                return {"all": True}
            return {"all": False, "exam_ids": granted + self.extra}
        asked = body["exam_ids"]
        ids = asked if granted == "all" else [i for i in asked if i in granted]
        return {"exam_ids": ids + self.extra}


@pytest.fixture
def platform() -> AccessPlatform:
    return AccessPlatform()


@pytest.fixture
def server(platform: AccessPlatform) -> Iterator[LoopbackServer]:
    with serving(platform) as server:
        yield server


@pytest.fixture
async def http_policy(server: LoopbackServer) -> AsyncIterator[HttpAccessPolicy]:
    policy = HttpAccessPolicy(server.url, timeout=httpx.Timeout(2.0))
    yield policy
    await policy.aclose()


async def test_http_decisions(http_policy: HttpAccessPolicy, platform: AccessPlatform) -> None:
    seven = principal("7", roles=["ROLE_USER", "ROLE_EXPERT"], expires_at=NOW)
    assert await http_policy.visible(seven, "read") == frozenset({1, 2, 3})
    assert await http_policy.visible(seven, "write") == frozenset()
    assert await http_policy.visible(principal(None, subject="sub-admin"), "read") is ALL
    assert await http_policy.allowed(seven, "read", [3, 4, 3]) == frozenset({3})
    path, body, headers = platform.requests[0]
    assert path == "/api/access/visible"
    # the user's identity only: no token, no other claim
    assert body == {
        "user": {
            "id": "7",
            "subject": "sub-alice",
            "username": "alice",
            "roles": ["ROLE_EXPERT", "ROLE_USER"],
        },
        "action": "read",
    }
    assert platform.requests[2][1]["user"]["id"] is None
    assert platform.requests[3][0] == "/api/access/allowed"
    assert platform.requests[3][1]["exam_ids"] == [3, 4]
    assert headers["content-type"] == "application/json"
    assert headers["accept"] == "application/json"
    assert "authorization" not in headers
    assert all("never sent" not in json.dumps(body) for _, body, _ in platform.requests)


async def test_http_allowed_in_batches(
    http_policy: HttpAccessPolicy, platform: AccessPlatform
) -> None:
    ids = list(range(1, 2501))
    assert await http_policy.allowed(principal("7"), "read", [0, -4, 2**63, *ids]) == frozenset(
        {1, 2, 3}
    )
    assert [len(body["exam_ids"]) for _, body, _ in platform.requests] == [1000, 1000, 500]
    platform.requests.clear()
    assert await http_policy.allowed(principal("7"), "read", []) == frozenset()
    assert await http_policy.allowed(principal("7"), "read", [0]) == frozenset()
    assert platform.requests == []  # nothing worth asking


async def test_http_ignores_ids_it_did_not_ask_for(
    http_policy: HttpAccessPolicy, platform: AccessPlatform
) -> None:
    platform.extra = [99]
    assert await http_policy.allowed(principal("7"), "read", [1, 5]) == frozenset({1})
    assert await http_policy.visible(principal("7"), "read") == frozenset({1, 2, 3, 99})


async def test_http_sends_the_platform_token(
    server: LoopbackServer, platform: AccessPlatform
) -> None:
    policy = HttpAccessPolicy(server.url, token="pl4tform-T0ken")
    try:
        assert await policy.visible(principal("7"), "read") == frozenset({1, 2, 3})
    finally:
        await policy.aclose()
    assert platform.requests[0][2]["authorization"] == "Bearer pl4tform-T0ken"
    assert policy._client is None


async def expect_unavailable(
    policy: HttpAccessPolicy,
    caplog: pytest.LogCaptureFixture,
    logged: str,
    *,
    allowed: bool = False,
) -> None:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shanoir_dicomweb_proxy.access"):
        with pytest.raises(AccessUnavailable) as info:
            if allowed:
                await policy.allowed(principal("7"), "read", [1, 2])
            else:
                await policy.visible(principal("7"), "read")
    error = info.value
    assert isinstance(error, ProxyError)
    assert (error.status, error.code) == (503, "access_unavailable")
    assert error.detail == "access decisions cannot be made now"
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert logged in caplog.text


@pytest.mark.parametrize("status", [500, 503, 404, 401, 403, 302, 204])
async def test_http_error_status(
    http_policy: HttpAccessPolicy,
    platform: AccessPlatform,
    caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    platform.status = status
    hint = " (check [access] token)" if status in (401, 403) else ""
    logged = f"access platform: POST {http_policy.url}/access/visible: answered {status}{hint}"
    await expect_unavailable(http_policy, caplog, logged)
    await expect_unavailable(
        http_policy, caplog, f"/access/allowed: answered {status}", allowed=True
    )


@pytest.mark.parametrize(
    ("raw", "logged"),
    [
        (b"<html>", "malformed answer: not JSON"),
        (b"[]", "malformed answer: expected an object"),
        (b'{"all": "yes"}', "malformed answer: all: expected true or false"),
        (b'{"all": false}', "malformed answer: exam_ids: expected an array of positive integers"),
        (b"{}", "malformed answer: exam_ids: expected an array of positive integers"),
        (b'{"exam_ids": ["1"]}', "malformed answer: exam_ids: expected an array of positive"),
        (b'{"exam_ids": [0]}', "malformed answer: exam_ids: expected an array of positive"),
        (b'{"exam_ids": [true]}', "malformed answer: exam_ids: expected an array of positive"),
        (b'{"exam_ids": [1.0]}', "malformed answer: exam_ids: expected an array of positive"),
        (b'{"exam_ids": {"1": true}}', "malformed answer: exam_ids: expected an array"),
    ],
)
async def test_http_garbage_fails_closed(
    http_policy: HttpAccessPolicy,
    platform: AccessPlatform,
    caplog: pytest.LogCaptureFixture,
    raw: bytes,
    logged: str,
) -> None:
    platform.raw = raw
    await expect_unavailable(http_policy, caplog, logged)
    await expect_unavailable(http_policy, caplog, "malformed answer: ", allowed=True)


async def test_http_timeout_and_unreachable(
    server: LoopbackServer, platform: AccessPlatform, caplog: pytest.LogCaptureFixture
) -> None:
    platform.delay = 1.0
    slow = HttpAccessPolicy(server.url, timeout=httpx.Timeout(0.2))
    started = time.monotonic()
    try:
        await expect_unavailable(slow, caplog, "/access/visible: no answer in time")
    finally:
        await slow.aclose()
    assert time.monotonic() - started < 0.9
    gone = HttpAccessPolicy(f"http://127.0.0.1:{free_port()}/api")
    try:
        await expect_unavailable(gone, caplog, "/access/allowed: ConnectError: ", allowed=True)
    finally:
        await gone.aclose()


def test_http_batch_size_bounds() -> None:
    with pytest.raises(ValueError, match="batch_size must be between 1 and 1000"):
        HttpAccessPolicy("http://127.0.0.1:1", batch_size=0)


# --- the cache --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class CountingPolicy:
    """Answers from a table, counts what it is asked; ``gate`` holds answers back, ``fail``
    makes the next N calls fail."""

    def __init__(self, table: dict[tuple[str, Action], Visible] | None = None) -> None:
        self.table: dict[tuple[str, Action], Visible] = table or {("7", "read"): frozenset({1, 2})}
        self.calls: list[tuple[Any, ...]] = []
        self.gate: anyio.Event | None = None
        self.fail = 0

    async def _answer(self, call: tuple[Any, ...]) -> Visible:
        self.calls.append(call)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            self.fail -= 1
            raise AccessUnavailable("access decisions cannot be made now")
        return self.table.get((call[1], call[2]), frozenset())

    async def visible(self, principal: Principal, action: Action) -> Visible:
        return await self._answer(("visible", user_key(principal), action))

    async def allowed(
        self, principal: Principal, action: Action, exam_ids: Collection[int]
    ) -> frozenset[int]:
        visible = await self._answer(("allowed", user_key(principal), action, sorted(exam_ids)))
        if isinstance(visible, frozenset):
            return visible.intersection(exam_ids)
        return frozenset(exam_ids)


def caching(inner: CountingPolicy, clock: Clock, ttl: float = 60) -> CachingAccessPolicy:
    return CachingAccessPolicy(inner, ttl=ttl, timer=clock)


async def test_cache_honours_the_ttl() -> None:
    inner, clock = CountingPolicy(), Clock()
    cache = caching(inner, clock)
    user = principal("7", expires_at=NOW + 3600)
    assert await cache.visible(user, "read") == frozenset({1, 2})
    clock.now += 59
    assert await cache.visible(principal("7", subject="another-session"), "read") == frozenset(
        {1, 2}
    )
    assert await cache.visible(user, "write") == frozenset()
    assert len(inner.calls) == 2  # read once, write once
    clock.now += 2  # 61 s after the first answer
    assert await cache.visible(user, "read") == frozenset({1, 2})
    assert [c[2] for c in inner.calls] == ["read", "write", "read"]


async def test_cache_never_outlives_the_token() -> None:
    inner, clock = CountingPolicy(), Clock()
    cache = caching(inner, clock, ttl=60)
    short = principal("7", expires_at=NOW + 1)
    assert await cache.visible(short, "read") == frozenset({1, 2})
    assert await cache.allowed(short, "write", [1]) == frozenset()
    clock.now += 0.5
    assert await cache.visible(short, "read") == frozenset({1, 2})
    assert await cache.allowed(short, "write", [1]) == frozenset()
    assert len(inner.calls) == 2
    clock.now += 1  # the token expired 0.5 s ago: its answers are gone
    assert await cache.visible(short, "read") == frozenset({1, 2})  # expired: straight through
    assert await cache.visible(short, "read") == frozenset({1, 2})
    assert len(inner.calls) == 4
    renewed = principal("7", expires_at=NOW + 3600)  # a new token of the same user
    assert await cache.visible(renewed, "read") == frozenset({1, 2})
    assert await cache.visible(renewed, "read") == frozenset({1, 2})
    assert len(inner.calls) == 5
    # the expired token is not answered from what the renewed one left in the cache
    assert await cache.visible(short, "read") == frozenset({1, 2})
    assert len(inner.calls) == 6
    no_expiry = principal("8")
    await cache.visible(no_expiry, "read")
    clock.now += 59
    await cache.visible(no_expiry, "read")
    assert len(inner.calls) == 7


async def test_cache_allowed_per_examination() -> None:
    inner, clock = CountingPolicy(), Clock()
    cache = caching(inner, clock)
    user = principal("7")
    assert await cache.allowed(user, "read", [1, 3]) == frozenset({1})
    assert await cache.allowed(user, "read", [1, 2, 3]) == frozenset({1, 2})
    assert await cache.allowed(user, "read", [3, 1, 2]) == frozenset({1, 2})
    assert await cache.allowed(user, "read", []) == frozenset()
    # denials are kept too; only examination 2 was missing the second time
    assert [c[3] for c in inner.calls] == [[1, 3], [2]]
    # a visible answer, once kept, answers allowed questions
    assert await cache.visible(user, "read") == frozenset({1, 2})
    assert await cache.allowed(user, "read", [2, 4, 5]) == frozenset({2})
    assert len(inner.calls) == 3
    inner.table[("8", "read")] = ALL
    assert await cache.visible(principal("8"), "read") is ALL
    assert await cache.allowed(principal("8"), "read", [4, 5]) == frozenset({4, 5})
    assert len(inner.calls) == 4


async def test_cache_keeps_no_failure() -> None:
    inner, clock = CountingPolicy(), Clock()
    cache = caching(inner, clock)
    inner.fail = 2
    with pytest.raises(AccessUnavailable):
        await cache.visible(principal("7"), "read")
    with pytest.raises(AccessUnavailable):
        await cache.allowed(principal("7"), "read", [1])
    assert await cache.visible(principal("7"), "read") == frozenset({1, 2})
    assert await cache.allowed(principal("7"), "read", [1]) == frozenset({1})
    assert len(inner.calls) == 3  # the last allowed came from the kept visible answer


async def test_cache_ttl_zero_keeps_nothing() -> None:
    inner, clock = CountingPolicy(), Clock()
    cache = caching(inner, clock, ttl=0)
    for _ in range(3):
        assert await cache.visible(principal("7"), "read") == frozenset({1, 2})
        assert await cache.allowed(principal("7"), "read", [2]) == frozenset({2})
    assert len(inner.calls) == 6
    with pytest.raises(ValueError, match="ttl must be >= 0"):
        CachingAccessPolicy(inner, ttl=-1)


async def test_cache_shares_identical_lookups_in_flight() -> None:
    inner, clock = CountingPolicy(), Clock()
    cache = caching(inner, clock)
    inner.gate = anyio.Event()
    answers: list[Visible] = []

    async def ask() -> None:
        answers.append(await cache.visible(principal("7"), "read"))

    async def ask_allowed() -> None:
        answers.append(await cache.allowed(principal("8"), "read", [3, 4]))

    async with anyio.create_task_group() as tasks:
        for _ in range(5):
            tasks.start_soon(ask)
            tasks.start_soon(ask_allowed)
        await anyio.wait_all_tasks_blocked()
        inner.gate.set()
    assert answers.count(frozenset({1, 2})) == 5 and answers.count(frozenset()) == 5
    assert sorted(c[0] for c in inner.calls) == ["allowed", "visible"]
    # a failure is shared by the calls that waited for it, and not kept
    inner.gate, inner.fail = anyio.Event(), 1
    errors: list[Exception] = []

    async def ask_failing() -> None:
        try:
            await cache.visible(principal("9"), "read")
        except AccessUnavailable as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tasks:
        for _ in range(3):
            tasks.start_soon(ask_failing)
        await anyio.wait_all_tasks_blocked()
        inner.gate.set()
    assert len(errors) == 3 and len(inner.calls) == 3
    inner.gate = None
    assert await cache.visible(principal("9"), "read") == frozenset()
    assert len(inner.calls) == 4


async def test_revoke_is_seen_after_the_ttl(store: SqliteStore) -> None:
    clock = Clock()
    store.grant("7", 1, "read")
    store.grant("7", 2, "read")
    cache = CachingAccessPolicy(SqliteAccessPolicy(store), ttl=30, timer=clock)
    user = principal("7", expires_at=NOW + 3600)
    assert await cache.visible(user, "read") == frozenset({1, 2})
    assert await cache.allowed(principal("7", subject="other"), "download", [1]) == frozenset()
    store.revoke("7", 2, "read")
    store.grant("7", 1, "download")
    clock.now += 29
    assert await cache.visible(user, "read") == frozenset({1, 2})  # still kept: at most 30 s
    assert await cache.allowed(user, "download", [1]) == frozenset()
    clock.now += 2
    assert await cache.visible(user, "read") == frozenset({1})
    assert await cache.allowed(user, "read", [2]) == frozenset()
    assert await cache.allowed(user, "download", [1]) == frozenset({1})


# --- build_access_policy and [access] token ---------------------------------------------------


def settings(tmp_path: Path, **access: Any) -> Settings:
    return Settings.from_dict(
        {
            "upstream": {"url": "http://127.0.0.1:8042/dicom-web"},
            "auth": {"enabled": False},
            "mapping": {"backend": "identity"},
            "access": access,
            "store": {"path": str(tmp_path / "store.sqlite3")},
        }
    )


async def test_build_allow_all(tmp_path: Path) -> None:
    policy = build_access_policy(settings(tmp_path, backend="allow_all"))
    assert isinstance(policy, ManagedAccessPolicy) and isinstance(policy.policy, AllowAll)
    assert await policy.visible(principal("7"), "write") is ALL
    assert await policy.allowed(principal("7"), "download", [5]) == frozenset({5})
    await policy.aclose()
    assert not (tmp_path / "store.sqlite3").exists()


async def test_build_sqlite_opens_and_closes_the_store(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "store.sqlite3") as store:
        store.register_study(_uid(1))
        store.grant("7", 1, "read")
    policy = build_access_policy(settings(tmp_path, cache_ttl=12))
    cache = policy.policy
    assert isinstance(cache, CachingAccessPolicy) and cache.ttl == 12
    inner = cache.inner
    assert isinstance(inner, SqliteAccessPolicy)
    async with policy:
        assert await policy.visible(principal("7"), "read") == frozenset({1})
    with pytest.raises(StoreError, match="the store is closed"):
        inner.store.grants()


async def test_build_sqlite_with_the_callers_store(store: SqliteStore, tmp_path: Path) -> None:
    store.grant("7", 3, "write")
    policy = build_access_policy(settings(tmp_path / "elsewhere"), store=store)
    assert await policy.allowed(principal("7"), "write", [3, 4]) == frozenset({3})
    await policy.aclose()
    assert store.grants("7") == [Grant("7", 3, "write")]  # still open
    assert not (tmp_path / "elsewhere").exists()


async def test_build_static(tmp_path: Path) -> None:
    (tmp_path / "grants.toml").write_text(STATIC_TOML)
    toml = tmp_path / "proxy.toml"
    toml.write_text(
        '[upstream]\nurl = "http://127.0.0.1:8042/dicom-web"\n[auth]\nenabled = false\n'
        '[mapping]\nbackend = "identity"\n[access]\nbackend = "static"\nfile = "grants.toml"\n'
    )
    policy = build_access_policy(Settings.from_toml(toml))  # file relative to proxy.toml
    assert isinstance(policy.policy, CachingAccessPolicy)
    assert isinstance(policy.policy.inner, StaticAccessPolicy)
    async with policy:
        assert await policy.visible(principal("7"), "read") == frozenset({1, 2, 3})


def test_build_static_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "grants.toml"
    path.write_text('[[grants]]\nuser = "7"\nexams = [-1]\nactions = ["read"]\n')
    with pytest.raises(ConfigError) as info:
        build_access_policy(settings(tmp_path, backend="static", file=str(path)))
    assert str(info.value) == (
        f"[access] file: {path}: item 1: exams: expected a positive integer, got -1"
    )


async def test_build_http_caches_and_closes(
    tmp_path: Path, server: LoopbackServer, platform: AccessPlatform
) -> None:
    config = settings(tmp_path, backend="http", url=server.url, token="abc", cache_ttl=30)
    policy = build_access_policy(config)
    cache = policy.policy
    assert isinstance(cache, CachingAccessPolicy) and cache.ttl == 30
    inner = cache.inner
    assert isinstance(inner, HttpAccessPolicy)
    async with policy:
        for _ in range(3):
            assert await policy.visible(principal("7"), "read") == frozenset({1, 2, 3})
        assert await policy.allowed(principal("7"), "read", [3, 4]) == frozenset({3})
        assert len(platform.requests) == 1
        assert platform.requests[0][2]["authorization"] == "Bearer abc"
        client = inner._client
        assert client is not None
    assert client.is_closed


def test_access_token_setting() -> None:
    assert AccessSettings().token == ""
    http = AccessSettings(backend="http", url="https://shanoir/api/", token="t0k.e_n")
    assert http.token == "t0k.e_n" and "t0k.e_n" not in repr(http)
    assert http.to_dict()["token"] == "***"


@pytest.mark.parametrize(
    ("access", "expected"),
    [
        ({"token": "abc"}, '[access] token: only used with backend = "http" (backend is "sqlite")'),
        (
            {"backend": "allow_all", "token": "abc"},
            '[access] token: only used with backend = "http" (backend is "allow_all")',
        ),
        (
            {"backend": "http", "url": "https://shanoir/api", "token": "a b"},
            "[access] token: expected a token of printable ASCII characters without spaces",
        ),
        (
            {"backend": "http", "url": "https://shanoir/api", "token": 12345},
            "[access] token: expected a string, got an integer",
        ),
    ],
)
def test_access_token_errors(tmp_path: Path, access: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(tmp_path, **access)
    assert str(info.value) == f"<dict>: {expected}"
