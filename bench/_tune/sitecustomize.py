"""Bench-only patches for the proxy process, selected by environment variables.

``bench/_servers.py`` puts this directory on ``PYTHONPATH`` for the proxy variants that need it;
the proxy itself knows nothing about it. Each applied patch is logged to stderr, so the bench
can check that it took effect.
"""

import os
import sys

_read = os.environ.get("BENCH_HTTPCORE_READ_NUM_BYTES")
if _read:
    from httpcore._async.http11 import AsyncHTTP11Connection

    AsyncHTTP11Connection.READ_NUM_BYTES = int(_read)
    print(f"bench-tune: BENCH_HTTPCORE_READ_NUM_BYTES={_read}", file=sys.stderr, flush=True)
