"""Faults while the soak's load runs: Orthanc killed and restarted, then stalled and resumed.

    python bench/faults.py [--clients 16] [--down 10] [--read-timeout 3]

Issue 19. The stack and the load of ``bench/soak.py`` (auth, sqlite mapping and access, real
Orthanc; viewer-like clients of 3 users), the proxy with ``[upstream] read_timeout`` of
``--read-timeout`` s. Besides the load, a probe searches ``/studies?limit=1`` every 50 ms and
notes each answer's status and time. Phases: 10 s of load; Orthanc SIGKILLed and left down
``--down`` s; started again (same port, the proxy untouched); 10 s; Orthanc stopped (SIGSTOP)
for ``read_timeout`` + 3 s; resumed (SIGCONT); 10 s. Then what the proxy still holds.

Printed per phase: the probe's statuses and slowest answer, the load's statuses, and how long
after Orthanc came back (or resumed) the first 200 came. Expected: 502 in well under a second
while Orthanc is down, 504 after ``read_timeout`` while it is stalled, 200 again within a second
of its return, no connection left once the load stops. It exits 0 once it has measured.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import report_in_workdir  # noqa: E402
from soak import JSON, ROOT_DIR, Load, Stack, _held, _setup  # noqa: E402

PROBE_EVERY = 0.05
SETTLE = 10.0


@dataclass
class Phase:
    name: str
    started: float
    probes: list[tuple[float, int, float]] = field(default_factory=list)  # at, status, seconds
    load: collections.Counter[int] = field(default_factory=collections.Counter)
    back_at: float | None = None  # when the upstream was back (restart done, SIGCONT)

    def line(self) -> str:
        statuses = collections.Counter(status for _, status, _ in self.probes)
        slowest = max((seconds for _, _, seconds in self.probes), default=0.0)
        text = (
            f"{self.name:<22} probe {dict(sorted(statuses.items()))}, slowest "
            f"{slowest * 1000:.0f} ms; load {dict(sorted(self.load.items()))}"
        )
        if self.back_at is not None:
            first = next((at + s for at, status, s in self.probes if status == 200), None)
            after = f"{(first - self.back_at) * 1000:.0f} ms" if first is not None else "never"
            text += f"; first 200 answered {after} after the upstream was back"
        return text


class Campaign:
    def __init__(self, stack: Stack, load: Load) -> None:
        self.stack = stack
        self.load = load
        self.phases: list[Phase] = []

    def phase(self, name: str) -> Phase:
        if self.phases:
            self.phases[-1].load.update(self.load.take().statuses)
        phase = Phase(name, time.monotonic())
        self.phases.append(phase)
        return phase

    async def probe(self) -> None:
        headers = {"Authorization": f"Bearer {self.stack.tokens['alice']}", "Accept": JSON}
        async with httpx.AsyncClient(
            base_url=self.stack.proxy.dicomweb_url, headers=headers, timeout=60, trust_env=False
        ) as http:
            while not self.load.stopping.is_set():
                started = time.monotonic()
                try:
                    status = (await http.get("/studies?limit=1")).status_code
                except httpx.HTTPError:
                    status = 0  # no answer at all
                self.phases[-1].probes.append((started, status, time.monotonic() - started))
                await asyncio.sleep(PROBE_EVERY)

    async def faults(self, down: float, stall: float) -> None:
        orthanc = self.stack.orthanc
        await asyncio.sleep(SETTLE)
        self.phase("Orthanc killed")
        orthanc.kill()
        await asyncio.sleep(down)
        phase = self.phase("Orthanc restarted")
        await asyncio.to_thread(orthanc.start)
        phase.back_at = time.monotonic()
        await asyncio.sleep(SETTLE)
        self.phase("Orthanc stalled")
        os.kill(orthanc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(stall)
        finally:
            os.kill(orthanc.pid, signal.SIGCONT)
        phase = self.phase("Orthanc resumed")
        phase.back_at = time.monotonic()
        await asyncio.sleep(SETTLE)
        self.phase("end")
        self.load.stopping.set()

    async def run(self, down: float, stall: float) -> None:
        self.phase("steady")
        await asyncio.gather(self.load.run(3600), self.probe(), self.faults(down, stall))


def run(args: argparse.Namespace, stack_: object, workdir: Path) -> list[str]:
    upstream = {"read_timeout": args.read_timeout}
    stack = _setup(stack_, workdir, args.cache, ttl=3600, upstream=upstream)  # type: ignore[arg-type]
    time.sleep(1.0)
    idle = _held(stack)
    campaign = Campaign(stack, Load(stack, args.clients, args.seed))
    asyncio.run(campaign.run(args.down, args.read_timeout + 3))
    time.sleep(2.0)
    fds, clients, upstream_held = _held(stack)
    return [
        f"faults: {args.clients} clients, Orthanc down {args.down:g} s, stalled "
        f"{args.read_timeout + 3:g} s with read_timeout = {args.read_timeout:g} s",
        *(p.line() for p in campaign.phases[:-1]),
        f"2 s after the load: {clients} client connections, {fds} descriptors "
        f"({idle[0]} idle before), {upstream_held} upstream",
        "load errors: "
        + (", ".join(f"{k} x{n}" for k, n in campaign.load.total.errors.most_common(6)) or "none"),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    parser.add_argument("--down", type=float, default=10, help="seconds Orthanc stays down")
    parser.add_argument("--read-timeout", type=float, default=3, help="[upstream] read_timeout")
    parser.add_argument("--seed", type=int, default=19, help="random seed of the load")
    parser.add_argument("--cache", type=Path, default=ROOT_DIR / "bench" / ".cache")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args(argv)
    return report_in_workdir("shanoir-bench-faults-", args.keep, lambda s, w: run(args, s, w))


if __name__ == "__main__":
    raise SystemExit(main())
