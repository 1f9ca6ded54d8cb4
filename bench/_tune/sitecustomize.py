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

_trace = os.environ.get("BENCH_TRACEMALLOC")
if _trace:
    # Snapshots of the proxy's Python allocations, every BENCH_TRACEMALLOC_EVERY seconds, to
    # the directory BENCH_TRACEMALLOC names (bench/soak.py --tracemalloc compares them).
    import threading
    import time
    import tracemalloc

    _every = float(os.environ.get("BENCH_TRACEMALLOC_EVERY", "30"))

    def _snapshots() -> None:
        # Tracing from the first import makes the start take minutes: trace from when the
        # proxy is serving (what grows under load is what matters).
        time.sleep(float(os.environ.get("BENCH_TRACEMALLOC_DELAY", "5")))
        tracemalloc.start(int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "12")))
        started = time.monotonic()
        while True:
            time.sleep(_every)
            path = os.path.join(_trace, f"{os.getpid()}-{time.monotonic() - started:08.1f}.snap")
            tracemalloc.take_snapshot().dump(path + ".tmp")
            os.replace(path + ".tmp", path)

    threading.Thread(target=_snapshots, daemon=True, name="bench-tracemalloc").start()
    print(f"bench-tune: BENCH_TRACEMALLOC={_trace}", file=sys.stderr, flush=True)

if os.environ.get("BENCH_HYPERCORN_H11"):
    # hypercorn's own HTTP/1.1 path (h11) instead of the proxy's httptools one, to compare both
    # in one run (the `hypercorn-h11` variant).
    from shanoir_dicomweb_proxy import _engines

    _engines._parse_with_httptools = lambda: None
    print("bench-tune: BENCH_HYPERCORN_H11=1", file=sys.stderr, flush=True)

if os.environ.get("BENCH_GC_DEFAULT"):
    # CPython's collector settings instead of those `serve` sets (`tune_gc`), to compare both
    # in one run (the `mapped-gc-default` variant).
    from shanoir_dicomweb_proxy import _engines

    _engines.tune_gc = lambda: None
    print("bench-tune: BENCH_GC_DEFAULT=1", file=sys.stderr, flush=True)
