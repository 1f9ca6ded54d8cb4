"""The SQLite file of the embedded store."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._access import ACTIONS, Action, grant_covers
from .._identifiers import SeriesEntry, is_domain_id, is_uid


class StoreError(Exception):
    """The store cannot be opened or used, or refused a change; the message says why."""


class StoreConflict(StoreError):
    """A registration or an import contradicts what the store (or the same import) holds."""


# --- schema ------------------------------------------------------------------------------------

# Migration N (1-based) takes a store from user_version N-1 to N. Append, never edit: a file
# written by an older version is brought forward on open, one step at a time.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # AUTOINCREMENT: an ID is never reused, even if its row were deleted one day, since
        # clients keep public UIDs (bookmarks, viewer states, SEG references).
        "CREATE TABLE examinations ("
        " exam_id INTEGER PRIMARY KEY AUTOINCREMENT CHECK (exam_id > 0),"
        " study_uid TEXT UNIQUE NOT NULL CHECK (study_uid <> ''))",
        "CREATE TABLE acquisitions ("
        " acquisition_id INTEGER PRIMARY KEY AUTOINCREMENT CHECK (acquisition_id > 0),"
        " exam_id INTEGER NOT NULL REFERENCES examinations (exam_id),"
        " series_uid TEXT UNIQUE NOT NULL CHECK (series_uid <> ''))",
        "CREATE INDEX acquisitions_by_exam ON acquisitions (exam_id, acquisition_id)",
    ),
    (
        # Who may do what on which examination (store grant|revoke). A grant of download also
        # allows read: that is decided when reading, the table holds what was granted.
        "CREATE TABLE grants ("
        " user TEXT NOT NULL CHECK (user <> ''),"
        " exam_id INTEGER NOT NULL REFERENCES examinations (exam_id),"
        " action TEXT NOT NULL CHECK (action IN ('read', 'download', 'write')),"
        " PRIMARY KEY (user, exam_id, action)) WITHOUT ROWID",
        "CREATE INDEX grants_by_exam ON grants (exam_id)",
    ),
)

SCHEMA_VERSION = len(_MIGRATIONS)
"""The schema version this code writes (``PRAGMA user_version``)."""

# PRAGMA application_id: marks the file as a store of this project ("SDWP").
_APPLICATION_ID = 0x53445750
# SQLite before 3.32 allows 999 parameters per statement.
_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Grant:
    """``user`` may ``action`` examination ``exam_id`` (``download`` also allows ``read``).

    ``user`` is the user key of a principal: its user ID (``[auth] user_claim``), else its
    subject.
    """

    user: str
    exam_id: int
    action: Action


@dataclass(frozen=True, slots=True)
class StudyEntry:
    """An examination, its real study UID, its acquisitions (by acquisition ID) and its grants
    (by user, then action)."""

    exam_id: int
    study_uid: str
    acquisitions: tuple[SeriesEntry, ...] = ()
    grants: tuple[Grant, ...] = ()


@dataclass(frozen=True, slots=True)
class Registration:
    """What :meth:`SqliteStore.register` did for one study and its series."""

    exam_id: int
    new_study: bool
    series: Mapping[str, int]  # series UID → acquisition ID, for the series registered
    new_series: int
    conflicts: tuple[str, ...] = ()  # series left out: they belong to another examination


@dataclass(frozen=True, slots=True)
class ImportRow:
    """One binding to import: an examination, and optionally one of its acquisitions.

    ``where`` names the row in error messages (``line 7``); ``row N`` when empty.
    """

    exam_id: int
    study_uid: str
    acquisition_id: int | None = None
    series_uid: str | None = None
    where: str = ""


@dataclass(frozen=True, slots=True)
class ImportGrant:
    """One grant to import; ``where`` names it in error messages (``grant 3`` when empty)."""

    user: str
    exam_id: int
    action: Action
    where: str = ""


@dataclass(frozen=True, slots=True)
class ImportSummary:
    """What :meth:`SqliteStore.import_entries` did."""

    rows: int
    new_studies: int
    new_series: int
    new_grants: int = 0


class SqliteStore:
    """The embedded store: one SQLite file (WAL journal, foreign keys on).

    The schema is migrated on open; a file written by a newer version is refused. With
    ``create=False`` a missing file is an error instead of a new empty store.

    Safe to use from several threads: one connection, every use under one lock. A batch of
    1000 UIDs is two indexed ``IN (...)`` queries, about 2 ms, mostly spent holding the GIL:
    50 such batches took 116 ms in turn on one connection, and 170-260 ms spread over 2 to 8
    threads with a connection each (2 cores). Per-thread connections would also multiply open
    files and page caches, and could not be closed by the thread that closes the store.
    """

    def __init__(self, path: str | Path, *, create: bool = True, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = _open(self.path, create=create, timeout=timeout)

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    def close(self) -> None:
        """Close the file; later calls raise :class:`StoreError`."""
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                conn.close()

    @property
    def schema_version(self) -> int:
        """The file's schema version (``PRAGMA user_version``)."""
        with self._using() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    # --- registration (store sync) ---------------------------------------------------------

    def register_study(self, study_uid: str) -> int:
        """The examination ID of ``study_uid``, registered with the next ID if it is new."""
        check_text("study_uid", study_uid)
        with self._write() as conn:
            return _register_study(conn, study_uid)[0]

    def register_series(self, exam_id: int, series_uid: str) -> int:
        """The acquisition ID of ``series_uid`` in examination ``exam_id``, registered with
        the next ID if it is new; :class:`StoreConflict` if it belongs to another examination.
        """
        check_text("series_uid", series_uid)
        with self._write() as conn:
            return _register_series(conn, exam_id, series_uid)[0]

    def register(self, study_uid: str, series_uids: Iterable[str]) -> Registration:
        """Register a study and its series in one transaction, in the order given.

        A series already registered under another examination is left out and reported in
        ``conflicts``; the others are registered.
        """
        check_text("study_uid", study_uid)
        uids = list(dict.fromkeys(series_uids))
        for uid in uids:
            check_text("series_uid", uid)
        series: dict[str, int] = {}
        conflicts: list[str] = []
        new_series = 0
        with self._write() as conn:
            exam_id, new_study = _register_study(conn, study_uid)
            for uid in uids:
                try:
                    series[uid], new = _register_series(conn, exam_id, uid)
                except StoreConflict as exc:
                    conflicts.append(f"study {study_uid}: {exc}")
                    continue
                new_series += new
        return Registration(exam_id, new_study, series, new_series, tuple(conflicts))

    # --- import ----------------------------------------------------------------------------

    def import_entries(
        self, rows: Iterable[ImportRow], grants: Iterable[ImportGrant] = ()
    ) -> ImportSummary:
        """Bind explicit IDs to UIDs, then add ``grants``: all or nothing (one transaction).

        A row that repeats what the store holds changes nothing. :class:`StoreConflict`, naming
        the row and both values, when an ID is bound to another UID, a UID to another ID, a
        series to another examination, or a row repeats an earlier row of the same import. A
        grant may repeat one the store (or the import) holds; its examination must be in the
        store or in the rows.
        """
        count = new_studies = new_series = new_grants = 0
        seen: dict[tuple[object, ...], str] = {}
        origin: dict[tuple[str, object], str] = {}  # what this import bound, and where
        with self._write() as conn:
            for count, row in enumerate(rows, 1):
                where = row.where or f"row {count}"
                check_row(row, where)
                key = (row.exam_id, row.study_uid, row.acquisition_id, row.series_uid)
                if key in seen:
                    raise StoreConflict(f"{where}: duplicate of {seen[key]}")
                seen[key] = where
                new_studies += _import_study(conn, row, where, origin)
                if row.acquisition_id is not None:
                    new_series += _import_series(conn, row, where, origin)
            for number, grant in enumerate(grants, 1):
                where = grant.where or f"grant {number}"
                new_grants += _grant(conn, grant.user, grant.exam_id, grant.action, where)
        return ImportSummary(count, new_studies, new_series, new_grants)

    # --- grants (store grant|revoke) -------------------------------------------------------

    def grant(self, user: str, exam_id: int, action: Action) -> bool:
        """Let ``user`` ``action`` examination ``exam_id``; False if it was granted already.

        :class:`StoreError` when the examination is not in the store.
        """
        with self._write() as conn:
            return _grant(conn, user, exam_id, action)

    def revoke(self, user: str, exam_id: int, action: Action) -> bool:
        """Remove that grant; False if there was none (a ``download`` grant is not touched by
        revoking ``read``, and still allows it)."""
        check_grant(user, exam_id, action)
        with self._write() as conn:
            cursor = conn.execute(
                "DELETE FROM grants WHERE user = ? AND exam_id = ? AND action = ?",
                (user, exam_id, action),
            )
            return cursor.rowcount > 0

    def grants(self, user: str | None = None) -> list[Grant]:
        """Every grant, or those of ``user``: by user, examination, action."""
        sql = "SELECT user, exam_id, action FROM grants"
        args: tuple[str, ...] = ()
        if user is not None:
            sql, args = sql + " WHERE user = ?", (user,)
        with self._using() as conn:
            rows = conn.execute(sql + " ORDER BY user, exam_id, action", args).fetchall()
        return [Grant(*row) for row in rows]

    def visible_exams(self, user: str, action: Action) -> set[int]:
        """The examinations ``user`` may ``action`` (a download grant gives read)."""
        covering = _covering(action)
        sql = (
            "SELECT DISTINCT exam_id FROM grants WHERE user = ?"
            f" AND action IN ({','.join('?' * len(covering))})"
        )
        with self._using() as conn:
            return {row[0] for row in conn.execute(sql, (user, *covering))}

    def allowed_exams(self, user: str, action: Action, exam_ids: Iterable[int]) -> set[int]:
        """The examinations of ``exam_ids`` that ``user`` may ``action``."""
        covering = _covering(action)
        sql = (
            "SELECT DISTINCT exam_id FROM grants WHERE user = ?"
            f" AND action IN ({','.join('?' * len(covering))}) AND exam_id IN ({{}})"
        )
        rows = self._select(sql, _ids(exam_ids), (user, *covering))
        return {row[0] for row in rows}

    # --- reads -----------------------------------------------------------------------------

    def has_examinations(self) -> bool:
        """Whether any examination is registered: one cheap query (readiness probes)."""
        with self._using() as conn:
            return bool(conn.execute("SELECT EXISTS (SELECT 1 FROM examinations)").fetchone()[0])

    def entries(self) -> list[StudyEntry]:
        """Every examination with its acquisitions, by ID (one consistent snapshot)."""
        with self._read() as conn:
            studies = conn.execute(
                "SELECT exam_id, study_uid FROM examinations ORDER BY exam_id"
            ).fetchall()
            series = conn.execute(
                "SELECT acquisition_id, exam_id, series_uid FROM acquisitions"
                " ORDER BY exam_id, acquisition_id"
            ).fetchall()
            grants = conn.execute(
                "SELECT user, exam_id, action FROM grants ORDER BY exam_id, user, action"
            ).fetchall()
        by_exam: dict[int, list[SeriesEntry]] = {}
        for acquisition_id, exam_id, uid in series:
            by_exam.setdefault(exam_id, []).append(SeriesEntry(acquisition_id, exam_id, uid))
        grants_of: dict[int, list[Grant]] = {}
        for user, exam_id, action in grants:
            grants_of.setdefault(exam_id, []).append(Grant(user, exam_id, action))
        return [
            StudyEntry(e, uid, tuple(by_exam.get(e, ())), tuple(grants_of.get(e, ())))
            for e, uid in studies
        ]

    def lookup_studies_by_uid(self, uids: Iterable[str]) -> dict[str, int]:
        """Real study UID → examination ID, for the UIDs the store knows."""
        sql = "SELECT study_uid, exam_id FROM examinations WHERE study_uid IN ({})"
        return dict(self._select(sql, _texts(uids)))

    def lookup_studies_by_id(self, exam_ids: Iterable[int]) -> dict[int, str]:
        """Examination ID → real study UID, for the IDs the store knows."""
        sql = "SELECT exam_id, study_uid FROM examinations WHERE exam_id IN ({})"
        return dict(self._select(sql, _ids(exam_ids)))

    def lookup_series_by_uid(self, uids: Iterable[str]) -> dict[str, SeriesEntry]:
        """Real series UID → its entry, for the UIDs the store knows."""
        sql = (
            "SELECT acquisition_id, exam_id, series_uid FROM acquisitions WHERE series_uid IN ({})"
        )
        return {row[2]: SeriesEntry(*row) for row in self._select(sql, _texts(uids))}

    def lookup_series_by_id(self, acquisition_ids: Iterable[int]) -> dict[int, SeriesEntry]:
        """Acquisition ID → its entry, for the IDs the store knows."""
        sql = (
            "SELECT acquisition_id, exam_id, series_uid FROM acquisitions"
            " WHERE acquisition_id IN ({})"
        )
        return {row[0]: SeriesEntry(*row) for row in self._select(sql, _ids(acquisition_ids))}

    # --- plumbing --------------------------------------------------------------------------

    def _select(self, sql: str, keys: list[Any], leading: tuple[Any, ...] = ()) -> list[Any]:
        """``sql`` with its ``{}`` filled with one ``?`` per key, in chunks; ``leading`` are the
        parameters that come before the keys."""
        rows: list[Any] = []
        with self._using() as conn:
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start : start + _CHUNK]
                query = sql.format(",".join("?" * len(chunk)))
                rows += conn.execute(query, (*leading, *chunk)).fetchall()
        return rows

    @contextmanager
    def _using(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                raise StoreError(f"{self.path}: the store is closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE so that two writers wait instead of failing."""
        with self._using() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._using() as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("ROLLBACK")  # nothing was written: just end the snapshot


def _open(path: Path, *, create: bool, timeout: float) -> sqlite3.Connection:
    if not create and not path.exists():
        raise StoreError(f"{path}: no store there (store sync or store import creates one)")
    mode = "rwc" if create else "rw"
    if create:
        _create_private(path)
    try:
        # isolation_level=None: transactions are explicit (BEGIN … COMMIT), nothing implicit.
        conn = sqlite3.connect(
            f"{path.absolute().as_uri()}?mode={mode}",
            uri=True,
            timeout=timeout,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open the store: {exc}") from exc
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_mode = WAL")
        _migrate(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(f"{path}: cannot open the store: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _create_private(path: Path) -> None:
    """Create a missing store file readable by its owner only (SQLite gives its -wal and -shm
    files the database's mode); an existing one is left as it is."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError:
        return  # sqlite3 says why, in the words of its error
    os.close(fd)


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    version = _check_version(conn, path)
    if version == SCHEMA_VERSION:
        return  # the usual case: no write lock taken
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _check_version(conn, path)  # another process may have migrated meanwhile
        for number in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[number - 1]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
        conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _check_version(conn: sqlite3.Connection, path: Path) -> int:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    application = int(conn.execute("PRAGMA application_id").fetchone()[0])
    if application not in (0, _APPLICATION_ID) or (
        version == 0 and conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone()
    ):
        raise StoreError(f"{path}: not a shanoir-dicomweb-proxy store (another database)")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: the store has schema version {version}, newer than this version of "
            f"shanoir-dicomweb-proxy understands ({SCHEMA_VERSION}): upgrade "
            "shanoir-dicomweb-proxy, or point [store] path at another file"
        )
    return version


def _register_study(conn: sqlite3.Connection, uid: str) -> tuple[int, bool]:
    row = conn.execute("SELECT exam_id FROM examinations WHERE study_uid = ?", (uid,)).fetchone()
    if row is not None:
        return int(row[0]), False
    cursor = conn.execute("INSERT INTO examinations (study_uid) VALUES (?)", (uid,))
    assert cursor.lastrowid is not None
    return cursor.lastrowid, True


def _register_series(conn: sqlite3.Connection, exam_id: int, uid: str) -> tuple[int, bool]:
    row = conn.execute(
        "SELECT acquisition_id, exam_id FROM acquisitions WHERE series_uid = ?", (uid,)
    ).fetchone()
    if row is not None:
        if row[1] != exam_id:
            raise StoreConflict(
                f"series {uid} is acquisition {row[0]} of examination {row[1]}, "
                f"not of examination {exam_id}"
            )
        return int(row[0]), False
    if not _exists(conn, "examinations", "exam_id", exam_id):
        raise StoreError(f"examination {exam_id} does not exist")
    cursor = conn.execute(
        "INSERT INTO acquisitions (exam_id, series_uid) VALUES (?, ?)", (exam_id, uid)
    )
    assert cursor.lastrowid is not None
    return cursor.lastrowid, True


def _grant(
    conn: sqlite3.Connection, user: str, exam_id: int, action: Action, where: str = ""
) -> bool:
    check_grant(user, exam_id, action, where)
    if not _exists(conn, "examinations", "exam_id", exam_id):
        raise StoreError(
            f"{_at(where)}examination {exam_id} is not in the store (store sync or store "
            "import registers it first)"
        )
    cursor = conn.execute(
        "INSERT OR IGNORE INTO grants (user, exam_id, action) VALUES (?, ?, ?)",
        (user, exam_id, action),
    )
    return cursor.rowcount > 0


def _covering(action: Action) -> tuple[Action, ...]:
    """The granted actions that allow ``action``."""
    if action not in ACTIONS:
        raise StoreError(f"action: expected one of {', '.join(ACTIONS)}, got {action!r}")
    return tuple(granted for granted in ACTIONS if grant_covers(granted, action))


def check_grant(user: object, exam_id: object, action: object, where: str = "") -> None:
    if not isinstance(user, str) or not user or user != user.strip():
        raise StoreError(
            f"{_at(where)}user: expected a user ID or subject (not empty, no surrounding "
            f"spaces), got {user!r}"
        )
    if not is_domain_id(exam_id):
        raise StoreError(f"{_at(where)}exam_id: expected a positive integer, got {exam_id!r}")
    if action not in ACTIONS:
        raise StoreError(
            f"{_at(where)}action: expected one of {', '.join(ACTIONS)}, got {action!r}"
        )


def _at(where: str) -> str:
    return f"{where}: " if where else ""


def _exists(conn: sqlite3.Connection, table: str, column: str, value: object) -> bool:
    sql = f"SELECT 1 FROM {table} WHERE {column} = ?"
    return conn.execute(sql, (value,)).fetchone() is not None


def _import_study(
    conn: sqlite3.Connection, row: ImportRow, where: str, origin: dict[tuple[str, object], str]
) -> bool:
    exam_id, uid = row.exam_id, row.study_uid
    by_id = conn.execute(
        "SELECT study_uid FROM examinations WHERE exam_id = ?", (exam_id,)
    ).fetchone()
    if by_id is not None and by_id[0] != uid:
        raise StoreConflict(
            f"{where}: examination {exam_id} is already study {by_id[0]} "
            f"({_origin(origin, 'exam', exam_id)}); this row says study {uid}"
        )
    by_uid = conn.execute("SELECT exam_id FROM examinations WHERE study_uid = ?", (uid,)).fetchone()
    if by_uid is not None and by_uid[0] != exam_id:
        raise StoreConflict(
            f"{where}: study {uid} is already examination {by_uid[0]} "
            f"({_origin(origin, 'study', uid)}); this row says examination {exam_id}"
        )
    if by_id is not None:
        return False
    conn.execute("INSERT INTO examinations (exam_id, study_uid) VALUES (?, ?)", (exam_id, uid))
    origin["exam", exam_id] = origin["study", uid] = where
    return True


def _import_series(
    conn: sqlite3.Connection, row: ImportRow, where: str, origin: dict[tuple[str, object], str]
) -> bool:
    acquisition_id, uid, exam_id = row.acquisition_id, row.series_uid, row.exam_id
    by_id = conn.execute(
        "SELECT series_uid FROM acquisitions WHERE acquisition_id = ?", (acquisition_id,)
    ).fetchone()
    if by_id is not None and by_id[0] != uid:
        raise StoreConflict(
            f"{where}: acquisition {acquisition_id} is already series {by_id[0]} "
            f"({_origin(origin, 'acquisition', acquisition_id)}); this row says series {uid}"
        )
    by_uid = conn.execute(
        "SELECT acquisition_id, exam_id FROM acquisitions WHERE series_uid = ?", (uid,)
    ).fetchone()
    if by_uid is not None and by_uid[0] != acquisition_id:
        raise StoreConflict(
            f"{where}: series {uid} is already acquisition {by_uid[0]} "
            f"({_origin(origin, 'series', uid)}); this row says acquisition {acquisition_id}"
        )
    if by_uid is not None and by_uid[1] != exam_id:
        raise StoreConflict(
            f"{where}: acquisition {acquisition_id} belongs to examination {by_uid[1]} "
            f"({_origin(origin, 'series', uid)}); this row says examination {exam_id}"
        )
    if by_uid is not None:
        return False
    conn.execute(
        "INSERT INTO acquisitions (acquisition_id, exam_id, series_uid) VALUES (?, ?, ?)",
        (acquisition_id, exam_id, uid),
    )
    origin["acquisition", acquisition_id] = origin["series", uid] = where
    return True


def _origin(origin: dict[tuple[str, object], str], kind: str, key: object) -> str:
    where = origin.get((kind, key))
    return f"by {where}" if where else "in the store"


def check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise StoreError(f"{name}: expected a non-empty string, got {value!r}")


def check_row(row: ImportRow, where: str) -> None:
    check_id(where, "exam_id", row.exam_id)
    check_uid(where, "study_uid", row.study_uid)
    if (row.acquisition_id is None) != (row.series_uid is None):
        raise StoreError(
            f"{where}: acquisition_id and series_uid go together (both, or neither for an "
            "examination without acquisitions)"
        )
    if row.acquisition_id is not None:
        check_id(where, "acquisition_id", row.acquisition_id)
        check_uid(where, "series_uid", row.series_uid)


def check_id(where: str, name: str, value: object) -> None:
    """An examination or acquisition ID, else :class:`StoreError` naming ``where`` and ``name``."""
    if not is_domain_id(value):
        raise StoreError(f"{where}: {name}: expected a positive integer, got {value!r}")


def check_uid(where: str, name: str, value: object) -> None:
    """A UID, else :class:`StoreError` naming ``where`` and ``name``."""
    if not is_uid(value):
        raise StoreError(
            f"{where}: {name}: expected a UID (digits and dots, at most 64 characters), "
            f"got {value!r}"
        )


def _texts(values: Iterable[str]) -> list[str]:
    return list({v for v in values if isinstance(v, str)})


def _ids(values: Iterable[int]) -> list[int]:
    # An ID beyond SQLite's INTEGER cannot be stored, so it is not known (rather than an
    # OverflowError on a public UID of 20 digits).
    return list({v for v in values if is_domain_id(v)})
