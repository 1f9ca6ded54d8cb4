"""Collects figures as they come and renders the tables, with targets and PASS/MISS."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from _clients import BulkRound, RequestStats, percentile

if TYPE_CHECKING:
    from run import Workload

__all__ = ["Report"]

MIB = 1024 * 1024

NOISY = 0.1  # other processes using more than this share of a core make figures unreliable


@dataclass
class _Row:
    target: str
    kind: str
    median: float  # seconds: a round (bulk) or a request (latency)
    p90: float
    rate: float  # MB/s (bulk) or requests/s
    extra: str = ""
    cpu: dict[str, float] = field(default_factory=dict)  # fraction of one core
    mapped: bool = False  # a proxy translating identifiers
    added: float | None = None  # seconds over direct, median of same-round differences


@dataclass
class _Table:
    workload: Workload
    rows: list[_Row] = field(default_factory=list)
    foreign: float | None = None  # cores used by other processes meanwhile


@dataclass
class _Verdict:
    workload: str
    target: str
    text: str
    passed: bool


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _cpu(row: _Row) -> str:
    own = row.cpu.get("self")
    orthanc = row.cpu.get("orthanc")
    left = "-" if own is None else f"{own * 100:.0f}%"
    right = "-" if orthanc is None else f"{orthanc * 100:.0f}%"
    return f"{left:>5} {right:>5}"


class Report:
    def __init__(self) -> None:
        self._head: list[str] = []
        self._notes: list[str] = []
        self._tables: dict[str, _Table] = {}
        self._memory: list[str] = []
        self._memory_verdicts: list[_Verdict] = []
        self._final_rss: list[str] = []
        self._profiles: list[str] = []

    # -- collecting ----------------------------------------------------------------------------

    def header(
        self,
        *,
        clients: dict[str, str],
        versions: dict[str, str],
        targets: Sequence[tuple[str, str, str]],
        quick: bool,
    ) -> None:
        self._head.append(
            f"shanoir-dicomweb-proxy bench ({'quick' if quick else 'full'} run, "
            f"{os.cpu_count()} CPUs)"
        )
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        self._head[-1] += f", load average {load} at start"
        self._head.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        how = {
            "curl": "curl, one process per round, --parallel for c>1",
            "wrk": "wrk -t1 (one thread), closed loop",
            "httpx": "httpx AsyncClient in its own process, 1 MiB reads",
        }
        self._head.append(
            f"load generators: bulk = {how[clients['bulk']]}; "
            f"request rates = {how[clients['requests']]}"
        )
        for name, base, note in targets:
            self._head.append(f"  {name:<20} {base}" + (f"  ({note})" if note else ""))

    def note(self, text: str) -> None:
        self._notes.append(text)

    def _table(self, workload: Workload) -> _Table:
        return self._tables.setdefault(workload.name, _Table(workload))

    def bulk(
        self,
        workload: Workload,
        target: str,
        kind: str,
        rounds: list[BulkRound],
        mapped: bool = False,
    ) -> None:
        seconds = [r.seconds for r in rounds]
        median = percentile(seconds, 50)
        size = rounds[0].bytes
        wall = sum(seconds)
        cpu = {key: sum(r.cpu.get(key, 0.0) for r in rounds) / wall for key in rounds[0].cpu}
        row = _Row(target, kind, median, percentile(seconds, 90), size / median / 1e6, cpu=cpu)
        row.mapped = mapped
        row.extra = f"{len(rounds)} rounds of {size / 1e6:.1f} MB"
        self._table(workload).rows.append(row)

    def requests(
        self,
        workload: Workload,
        target: str,
        kind: str,
        stats: RequestStats,
        mapped: bool = False,
        added: float | None = None,
    ) -> None:
        """``added``: an interleaved run's paired difference to direct (``PairedStats``)."""
        cpu = {key: value / stats.seconds for key, value in stats.cpu.items()}
        row = _Row(target, kind, stats.p50, stats.p90, stats.rate, cpu=cpu, mapped=mapped)
        row.added = added
        row.extra = f"{stats.requests} requests, {stats.bytes / stats.seconds / 1e6:.0f} MB/s"
        if added is not None:
            row.extra += f", {added * 1000:+.2f} ms over direct in the same rounds (median)"
        if stats.errors:
            row.extra += f", {stats.errors} ERRORS"
        self._table(workload).rows.append(row)

    def foreign(self, workload: Workload, share: float) -> None:
        self._table(workload).foreign = share
        if share > NOISY:
            self.note(
                f"{workload.name}: other processes used {share * 100:.0f}% of a core meanwhile; "
                "its figures are disturbed, run it again on a quiet machine"
            )

    def memory(
        self, target: str, baseline: int, peak: int, size: int, seconds: float, limit_mib: float
    ) -> None:
        growth = (peak - baseline) / MIB
        passed = growth < limit_mib
        self._memory.append(
            f"  {target:<18} baseline {baseline / MIB:6.1f} MiB  peak {peak / MIB:6.1f} MiB  "
            f"growth {growth:5.1f} MiB   ({size / 1e6:.1f} MB in {seconds:.1f} s)   "
            f"target < {limit_mib:.0f} MiB  {'PASS' if passed else 'MISS'}"
        )
        text = f"RSS growth {growth:.1f} MiB (target < {limit_mib:.0f})"
        self._memory_verdicts.append(_Verdict("memory", target, text, passed))

    def final_rss(self, target: str, rss: int) -> None:
        self._final_rss.append(f"{target} {rss / MIB:.0f} MiB")

    def profile(
        self, workload: str, target: str, frames: list[tuple[float, str]], path: Path
    ) -> None:
        self._profiles.append(f"{workload} {target}: py-spy self samples ({path})")
        self._profiles += [f"    {share * 100:5.1f}%  {frame}" for share, frame in frames]

    # -- rendering -----------------------------------------------------------------------------

    def _verdicts(self, table: _Table, row: _Row) -> tuple[str, str, str, _Verdict | None]:
        """(x direct, x nginx, target text, verdict) for a proxy row."""
        refs = {r.kind: r for r in table.rows if r.kind in ("direct", "nginx")}
        goal = table.workload.target
        ratios: dict[str, float] = {}
        for kind, ref in refs.items():
            if goal == "latency":
                ratios[kind] = ref.median / row.median  # >1: the proxy answers faster
            else:
                ratios[kind] = row.rate / ref.rate
        shown = [f"{ratios[k]:.3f}" if k in ratios else "-" for k in ("direct", "nginx")]
        target = table.workload.goal
        if target is None or target.versus not in refs:
            return shown[0], shown[1], "(figures only)", None
        if target.added_ms is not None:
            added = (row.median - refs[target.versus].median) * 1000
            if row.added is not None and target.versus == "direct":
                added = row.added * 1000  # paired: Orthanc's drift cancels out
            text = f"<= +{target.added_ms} ms vs {target.versus}"
            passed = added <= target.added_ms
            figure = f"+{added:.2f} ms vs {target.versus}"
        else:
            least = target.mapped if row.mapped else target.identity
            what = "latency" if goal == "latency" else "rate"
            text = f">= {least}x {target.versus} ({what})"
            passed = ratios[target.versus] >= least
            figure = f"{ratios[target.versus]:.3f}x {target.versus}"
        verdict = _Verdict(table.workload.name, row.target, text if passed else figure, passed)
        return shown[0], shown[1], text, verdict

    def render(self) -> str:
        out = [*self._head, ""]
        verdicts: list[_Verdict] = []
        header = (
            f"  {'target':<18} {'median':>10} {'p90':>10} {'rate':>12}  {'cpu hop/orthanc':>15}"
            f"  {'x direct':>8} {'x nginx':>7}  {'target':<28} verdict"
        )
        if self._memory:
            out += ["memory: RSS of the proxy process, sampled every 20 ms", *self._memory, ""]
            verdicts += self._memory_verdicts
        for table in self._tables.values():
            workload = table.workload
            other = ""
            if table.foreign is not None:
                other = f"   (other processes: {table.foreign * 100:.0f}% of a core)"
            out.append(f"{workload.name}: {workload.title}{other}")
            out.append(header)
            for row in table.rows:
                unit = "MB/s" if workload.kind == "bulk" else "req/s"
                line = (
                    f"  {row.target:<18} {_ms(row.median):>10} {_ms(row.p90):>10} "
                    f"{row.rate:>7.0f} {unit:<5} {_cpu(row):>15}"
                )
                if row.kind == "proxy":
                    x_direct, x_nginx, goal, verdict = self._verdicts(table, row)
                    mark = "" if verdict is None else ("PASS" if verdict.passed else "MISS")
                    line += f"  {x_direct:>8} {x_nginx:>7}  {goal:<28} {mark}"
                    if verdict is not None:
                        verdicts.append(verdict)
                out.append(line.rstrip() + f"    [{row.extra}]")
            out.append("")
        out.append(
            "median/p90: per round (bulk: all c transfers of a round) or per request; "
            "rate: MB/s (1e6 B/s) or requests/s; cpu: share of one core used by the hop "
            "(nginx or proxy) and by Orthanc during the measurement; x direct / x nginx: "
            "throughput ratio (bulk, frames) or latency ratio reference/proxy (QIDO, metadata)."
        )
        out += self._comparison()
        if self._final_rss:
            out.append("proxy RSS at the end of the run: " + ", ".join(self._final_rss))
        if self._profiles:
            out += ["", "profiles (non-blocking py-spy, self time by function):", *self._profiles]
        if self._notes:
            out += ["", "notes:", *(f"  - {n}" for n in self._notes)]
        misses = [v for v in verdicts if not v.passed]
        out += ["", f"targets: {len(verdicts) - len(misses)} PASS, {len(misses)} MISS"]
        out += [f"  MISS {v.workload} {v.target}: {v.text}" for v in misses]
        return "\n".join(out)

    def _comparison(self) -> list[str]:
        """With several proxy variants: each one's key figure per workload, best first."""
        proxies = list(
            dict.fromkeys(
                r.target for t in self._tables.values() for r in t.rows if r.kind == "proxy"
            )
        )
        if len(proxies) < 2:
            return []
        out = [
            "",
            "proxy variants side by side (bulk: MB/s; frames: req/s; QIDO, metadata: median ms)",
        ]
        out.append(f"  {'workload':<16}" + "".join(f"{p:>19}" for p in proxies) + "   best")
        for table in self._tables.values():
            rows = {r.target: r for r in table.rows if r.kind == "proxy"}
            latency = table.workload.target == "latency"

            def figure(row: _Row, latency: bool = latency) -> float:
                return row.median * 1000 if latency else row.rate

            best = (min if latency else max)(rows.values(), key=figure)
            cells = "".join(
                f"{figure(rows[p]):>19.1f}" if p in rows else f"{'-':>19}" for p in proxies
            )
            out.append(f"  {table.workload.name:<16}{cells}   {best.target}")
        return out
