"""The embedded store: examination and acquisition IDs for the upstream's studies and series, in
one SQLite file (DESIGN §3, §5, §9).

- :class:`SqliteStore`: the file itself, synchronous, for the command line (``store sync``,
  ``store list``, ``store import``, ``store grant``, ``store revoke``) and for the ``sqlite``
  backends of ``_backends`` (its identifier map and its grants).
- :func:`sync_store`: walk the upstream with QIDO and register every study and series.
- :func:`load_import`: read a JSON or CSV export into :class:`ImportRow` and
  :class:`ImportGrant` values (:func:`load_import_file`: the rows only).

IDs are assigned once and never change or get reused, so that a public UID a client has seen
always names the same study.
"""

from ._importing import ImportFile, check_keys, load_import, load_import_file
from ._sqlite import (
    SCHEMA_VERSION,
    Grant,
    ImportGrant,
    ImportRow,
    ImportSummary,
    Registration,
    SqliteStore,
    StoreConflict,
    StoreError,
    StudyEntry,
    check_id,
    check_row,
    check_uid,
)
from ._sync import SyncProgress, sync_store

__all__ = [
    "SCHEMA_VERSION",
    "Grant",
    "ImportFile",
    "ImportGrant",
    "ImportRow",
    "ImportSummary",
    "Registration",
    "SqliteStore",
    "StoreConflict",
    "StoreError",
    "StudyEntry",
    "SyncProgress",
    "check_id",
    "check_keys",
    "check_row",
    "check_uid",
    "load_import",
    "load_import_file",
    "sync_store",
]
