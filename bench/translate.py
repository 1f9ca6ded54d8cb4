"""The cost of identifier translation in DICOM JSON, in process, on one core.

    python bench/translate.py [--mb 100]

Builds study metadata shaped like Orthanc's (pretty-printed, ~150 elements per instance, a
nested reference sequence in every tenth instance), then feeds it in 64 KiB chunks through the
proxy's JsonRewriter with an in-memory map, next to a plain orjson parse + dump of the whole
document as the reference. Prints MB/s and the peak extra memory (tracemalloc) for two study
sizes: the peak must not grow with the study.

Target (issue 4): >= 100 MB/s of dicom+json rewritten per core, peak memory independent of
study size.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import tracemalloc
from typing import Any

import orjson

from shanoir_dicomweb_proxy._dicom import JsonRewriter, Translation, UidCollector

CHUNK = 64 * 1024
STUDY = "1.2.826.0.1.3680043.8.498.10835007674326226074257568518603517927"
UPSTREAM = "http://127.0.0.1:8042/dicom-web"


def _series(n: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.2533215974594181109490704614436998{n:04d}"


def _instance(index: int) -> dict[str, Any]:
    series = _series(index % 8)
    sop = f"1.2.826.0.1.3680043.8.498.1305058566614257812043530441169828{index:05d}"
    data: dict[str, Any] = {}
    for k in range(140):
        data[f"0019{k:04X}"] = {"vr": "LO", "Value": [f"value {k} of instance {index}"]}
    data["00080018"] = {"vr": "UI", "Value": [sop]}
    data["0020000D"] = {"vr": "UI", "Value": [STUDY]}
    data["0020000E"] = {"vr": "UI", "Value": [series]}
    data["00200032"] = {"vr": "DS", "Value": [-120.5, -98.25, float(index)]}
    data["7FE00010"] = {
        "vr": "OW",
        "BulkDataURI": f"{UPSTREAM}/studies/{STUDY}/series/{series}/instances/{sop}/bulk/7fe00010",
    }
    if index % 10 == 0:
        ref = {"0020000E": {"vr": "UI", "Value": [_series((index + 1) % 8)]}}
        data["00081115"] = {"vr": "SQ", "Value": [ref]}
    return dict(sorted(data.items()))


def _document(megabytes: float) -> bytes:
    one = len(orjson.dumps(_instance(0), option=orjson.OPT_INDENT_2))
    count = max(1, int(megabytes * 1e6 / one))
    return orjson.dumps([_instance(i) for i in range(count)], option=orjson.OPT_INDENT_2)


TRANSLATION = Translation(
    studies={STUDY: "1.4.9.12.34.1.8527.42"},
    series={_series(n): f"1.4.9.12.34.2.8527.{100 + n}" for n in range(8)},
    upstream_base=UPSTREAM,
    public_base="https://gateway.example.org/dicomweb",
)


async def _resolve(collector: UidCollector) -> Translation:
    return TRANSLATION


async def _rewrite(document: bytes) -> int:
    rewriter = JsonRewriter(_resolve, study_known=True)
    size = 0
    view = memoryview(document)
    for start in range(0, len(document), CHUNK):
        size += len(await rewriter.feed(bytes(view[start : start + CHUNK])))
    return size + len(await rewriter.close())


def _measure(document: bytes, rounds: int) -> tuple[float, float, float]:
    """(rewrite MB/s, orjson loads+dumps MB/s, rewrite peak extra MiB)."""
    rewrite, plain = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        asyncio.run(_rewrite(document))
        rewrite.append(len(document) / (time.perf_counter() - start) / 1e6)
        start = time.perf_counter()
        orjson.dumps(orjson.loads(document))
        plain.append(len(document) / (time.perf_counter() - start) / 1e6)
    tracemalloc.start()
    asyncio.run(_rewrite(document))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return statistics.median(rewrite), statistics.median(plain), peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100, help="size of the large study")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{'study':>12} {'rewrite MB/s':>13} {'orjson MB/s':>12} {'peak extra MiB':>15}")
    for megabytes in (args.mb / 10, args.mb):
        document = _document(megabytes)
        out = asyncio.run(_rewrite(document))
        assert out > 0
        rewrite, plain, peak = _measure(document, args.rounds)
        label = f"{len(document) / 1e6:.0f} MB"
        print(f"{label:>12} {rewrite:>13.0f} {plain:>12.0f} {peak:>15.1f}")


if __name__ == "__main__":
    main()
