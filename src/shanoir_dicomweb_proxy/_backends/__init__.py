"""The backends of ``[mapping]`` and ``[access]`` (DESIGN §5): identifier maps and access
policies, side by side, with the caches in front of them.

- ``_sqlite``: the embedded store's map and grants (the default).
- ``_static``: a file read once (``_files`` reads it).
- ``_platform``: the ``http`` contract a platform implements.
- ``_shanoir``, ``_shanoir_api``: a running Shanoir-NG's examinations and rights.
- ``_cache``: the TTL caches in front of any map and any policy.
- ``_build``: what a configuration builds, and what an app holds (:class:`Backends`).

A new backend implements :class:`~shanoir_dicomweb_proxy.IdentifierMap` or
:class:`~shanoir_dicomweb_proxy.AccessPolicy` in a module of its own here, and gets a branch in
``_build`` (``docs/architecture.md``).
"""

from ._build import (
    Backends,
    ManagedAccessPolicy,
    ManagedIdentifierMap,
    build_access_policy,
    build_identifier_map,
    open_store,
    shanoir_directory,
)
from ._cache import CachingAccessPolicy, CachingIdentifierMap
from ._platform import HttpAccessPolicy, HttpIdentifierMap, PlatformClient
from ._shanoir import ShanoirAccessPolicy, ShanoirDirectory, ShanoirIdentifierMap
from ._sqlite import SqliteAccessPolicy, SqliteIdentifierMap
from ._static import StaticAccessPolicy, StaticGrant, StaticIdentifierMap

__all__ = [
    "Backends",
    "CachingAccessPolicy",
    "CachingIdentifierMap",
    "HttpAccessPolicy",
    "HttpIdentifierMap",
    "ManagedAccessPolicy",
    "ManagedIdentifierMap",
    "PlatformClient",
    "ShanoirAccessPolicy",
    "ShanoirDirectory",
    "ShanoirIdentifierMap",
    "SqliteAccessPolicy",
    "SqliteIdentifierMap",
    "StaticAccessPolicy",
    "StaticGrant",
    "StaticIdentifierMap",
    "build_access_policy",
    "build_identifier_map",
    "open_store",
    "shanoir_directory",
]
