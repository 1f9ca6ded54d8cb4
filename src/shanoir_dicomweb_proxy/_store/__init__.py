"""The embedded store: examination and acquisition IDs for the upstream's studies and series, in
one SQLite file (DESIGN §3, §5, §9).

- :class:`SqliteStore`: the file itself, synchronous, for the command line (``store sync``,
  ``store list``, ``store import``, ``store grant``, ``store revoke``), for the maps below and
  for the access policy of ``[access] backend = "sqlite"``.
- :class:`SqliteIdentifierMap`: the :class:`~shanoir_dicomweb_proxy._identifiers.IdentifierMap`
  answered from a store, off the event loop.
- :class:`CachingIdentifierMap`: a TTL cache in front of any ``IdentifierMap``.
- :func:`sync_store`: walk the upstream with QIDO and register every study and series.
- :func:`load_import`: read a JSON or CSV export into :class:`ImportRow` and
  :class:`ImportGrant` values (:func:`load_import_file`: the rows only).

IDs are assigned once and never change or get reused, so that a public UID a client has seen
always names the same study.
"""

from ._cache import CachingIdentifierMap
from ._importing import ImportFile, load_import, load_import_file
from ._sqlite import (
    SCHEMA_VERSION,
    Grant,
    ImportGrant,
    ImportRow,
    ImportSummary,
    Registration,
    SqliteIdentifierMap,
    SqliteStore,
    StoreConflict,
    StoreError,
    StudyEntry,
)
from ._sync import SyncProgress, sync_store

__all__ = [
    "SCHEMA_VERSION",
    "CachingIdentifierMap",
    "Grant",
    "ImportFile",
    "ImportGrant",
    "ImportRow",
    "ImportSummary",
    "Registration",
    "SqliteIdentifierMap",
    "SqliteStore",
    "StoreConflict",
    "StoreError",
    "StudyEntry",
    "SyncProgress",
    "load_import",
    "load_import_file",
    "sync_store",
]
