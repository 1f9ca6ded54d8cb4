"""An httpx load generator, run as its own process (used when curl or wrk is missing).

Reads a JSON spec on stdin, writes JSON results on stdout:

- ``{"mode": "bulk", "urls": [...], "headers": {...}, "reps": N, "warmup": W}``: each round
  fetches all ``urls`` concurrently (``aiter_raw``, discarded) -> ``{"rounds": [[s, bytes]]}``
- ``{"mode": "requests", "urls": [...], "headers": {...}, "concurrency": C, "duration": D}``:
  a closed loop of C workers cycling through ``urls`` -> ``{"latencies": [...], "seconds": ...,
  "errors": n, "bytes": n}``
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from typing import Any

import httpx
from httpcore._async.http11 import AsyncHTTP11Connection

# The client is the measuring instrument, not the thing measured: make it read in big chunks
# so that it takes as little of the 2 cores as it can.
AsyncHTTP11Connection.READ_NUM_BYTES = 1024 * 1024


async def _fetch(client: httpx.AsyncClient, url: str) -> int:
    size = 0
    async with client.stream("GET", url) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: status {response.status_code}")
        async for chunk in response.aiter_raw():
            size += len(chunk)
    return size


async def _bulk(client: httpx.AsyncClient, spec: dict[str, Any]) -> dict[str, Any]:
    rounds = []
    for rep in range(spec["warmup"] + spec["reps"]):
        start = time.perf_counter()
        sizes = await asyncio.gather(*(_fetch(client, url) for url in spec["urls"]))
        elapsed = time.perf_counter() - start
        if rep >= spec["warmup"]:
            rounds.append([elapsed, sum(sizes)])
    return {"rounds": rounds}


async def _requests(client: httpx.AsyncClient, spec: dict[str, Any]) -> dict[str, Any]:
    urls = itertools.cycle(spec["urls"])
    latencies: list[float] = []
    errors = 0
    size = 0
    deadline = time.perf_counter() + spec["duration"]

    async def worker() -> None:
        nonlocal errors, size
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                size += await _fetch(client, next(urls))
            except (httpx.HTTPError, RuntimeError):
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
    return {
        "latencies": latencies,
        "seconds": time.perf_counter() - start,
        "errors": errors,
        "bytes": size,
    }


async def main() -> None:
    spec = json.load(sys.stdin)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        headers=spec["headers"], timeout=300, limits=limits, trust_env=False
    ) as client:
        run = _bulk if spec["mode"] == "bulk" else _requests
        json.dump(await run(client, spec), sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
