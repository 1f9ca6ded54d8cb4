"""The dicomweb-client matrix: every transaction of the real client, direct to Orthanc and
through the proxy, with identity mapping and with the SQLite mapping.

What passes direct must pass through the proxy with the same content (compared in a form
that does not depend on UIDs: counts, SOP Instance UIDs, pixel and image digests); what the
proxy adds to Orthanc (thumbnails, the client's default Accept for frames and bulk data, byte
ranges, WADO-URI) must pass through the proxy even where it fails direct. DELETE is refused
on purpose (405). Uploads with ``store_instances`` are in test_upstream_uploads.py and
test_rewrite_stow.py, on archives of their own.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer, SampleSet

from .support.archive import SERIES_ROOT, STUDY_ROOT
from .support.settings import ProxyFactory

JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"


@dataclass(frozen=True)
class Target:
    """One side of the comparison: a DICOMweb base URL and the UIDs of one image there."""

    url: str
    study: str
    series: str
    instance: str

    @property
    def client(self) -> DICOMwebClient:
        return DICOMwebClient(self.url)

    @property
    def ids(self) -> tuple[str, str, str]:
        return self.study, self.series, self.instance

    @property
    def instance_path(self) -> str:
        return f"{self.url}/studies/{self.study}/series/{self.series}/instances/{self.instance}"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _datasets(datasets: Any) -> list[tuple[str, str, str]]:
    return sorted(
        (ds.SOPInstanceUID, str(ds.file_meta.TransferSyntaxUID), _digest(ds.get("PixelData", b"")))
        for ds in datasets
    )


def _sops(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(row["00080018"]["Value"][0] for row in rows)


def _http(response: httpx.Response) -> tuple[int, str]:
    response.raise_for_status()
    return response.status_code, _digest(response.content)


def _wado_uri(t: Target, content_type: str) -> tuple[int, str]:
    base = t.url.rsplit("/", 1)[0] if t.url.endswith("/dicom-web") else t.url
    query = f"requestType=WADO&studyUID={t.study}&seriesUID={t.series}&objectUID={t.instance}"
    response = httpx.get(f"{base}/wado?{query}&contentType={content_type}", timeout=30)
    response.raise_for_status()
    if content_type == "application/dicom":
        return response.status_code, pydicom.dcmread(io.BytesIO(response.content)).SOPInstanceUID
    return response.status_code, response.headers["content-type"]


def _bulk_url(t: Target) -> str:
    url: str = t.client.retrieve_instance_metadata(*t.ids)["7FE00010"]["BulkDataURI"]
    return url


Transaction = Callable[[Target], Any]

#: Transactions Orthanc serves: through the proxy they must give what they give direct.
SERVED: dict[str, Transaction] = {
    "search_for_studies": lambda t: len(t.client.search_for_studies()),
    "search_for_series in study": lambda t: len(t.client.search_for_series(t.study)),
    "search_for_instances in series": lambda t: _sops(
        t.client.search_for_instances(t.study, t.series)
    ),
    "search_for_instances with includefield": lambda t: _sops(
        t.client.search_for_instances(t.study, fields=["00080060", "00200013"])
    ),
    "retrieve_study": lambda t: _datasets(t.client.retrieve_study(t.study)),
    "iter_study": lambda t: _datasets(t.client.iter_study(t.study)),
    "retrieve_series": lambda t: _datasets(t.client.retrieve_series(t.study, t.series)),
    "iter_series": lambda t: _datasets(t.client.iter_series(t.study, t.series)),
    "retrieve_instance": lambda t: _datasets([t.client.retrieve_instance(*t.ids)]),
    "retrieve_instance as JPEG lossless": lambda t: _datasets(
        [t.client.retrieve_instance(*t.ids, media_types=(("application/dicom", JPEG_LOSSLESS),))]
    ),
    "retrieve_study_metadata": lambda t: _sops(t.client.retrieve_study_metadata(t.study)),
    "retrieve_series_metadata": lambda t: _sops(
        t.client.retrieve_series_metadata(t.study, t.series)
    ),
    "retrieve_instance_metadata": lambda t: _sops([t.client.retrieve_instance_metadata(*t.ids)]),
    "retrieve_instance_frames octet-stream": lambda t: [
        _digest(f)
        for f in t.client.retrieve_instance_frames(
            *t.ids, [1], media_types=("application/octet-stream",)
        )
    ],
    "iter_instance_frames octet-stream": lambda t: [
        _digest(f)
        for f in t.client.iter_instance_frames(
            *t.ids, [1], media_types=("application/octet-stream",)
        )
    ],
    "retrieve_instance_frames as JPEG lossless": lambda t: len(
        t.client.retrieve_instance_frames(*t.ids, [1], media_types=(("image/jpeg", JPEG_LOSSLESS),))
    ),
    "retrieve_instance_rendered jpeg": lambda t: _digest(
        t.client.retrieve_instance_rendered(*t.ids, media_types=("image/jpeg",))
    ),
    "retrieve_instance_frames_rendered": lambda t: _digest(
        t.client.retrieve_instance_frames_rendered(*t.ids, [1], media_types=("image/png",))
    ),
    "retrieve_series_rendered": lambda t: _digest(
        t.client.retrieve_series_rendered(t.study, t.series, media_types=("image/jpeg",))
    ),
}

#: What the proxy adds to Orthanc: it must pass through the proxy, whatever it does direct.
ADDED: dict[str, Transaction] = {
    "retrieve_instance_frames, default Accept": lambda t: [
        _digest(f) for f in t.client.retrieve_instance_frames(*t.ids, [1])
    ],
    # Direct, Orthanc's BulkDataURI names port 80: dicomweb-client's Host header has no port.
    "retrieve_bulkdata octet-stream": lambda t: [
        _digest(v)
        for v in t.client.retrieve_bulkdata(_bulk_url(t), media_types=("application/octet-stream",))
    ],
    "retrieve_bulkdata, default Accept": lambda t: [
        _digest(v) for v in t.client.retrieve_bulkdata(_bulk_url(t))
    ],
    "retrieve_bulkdata with a byte range": lambda t: [
        len(v) for v in t.client.retrieve_bulkdata(_bulk_url(t), byte_range=(0, 99))
    ],
    # dicomweb-client sends the viewport's comma encoded, which Orthanc does not decode.
    "retrieve_instance_rendered png with parameters": lambda t: _digest(
        t.client.retrieve_instance_rendered(
            *t.ids, media_types=("image/png",), params={"viewport": "32,32", "quality": "80"}
        )
    ),
    "instance thumbnail": lambda t: _http(
        httpx.get(t.instance_path + "/thumbnail", headers={"accept": "image/jpeg"})
    ),
    "series thumbnail": lambda t: _http(
        httpx.get(
            f"{t.url}/studies/{t.study}/series/{t.series}/thumbnail",
            headers={"accept": "image/jpeg"},
        )
    ),
    "study thumbnail": lambda t: _http(
        httpx.get(f"{t.url}/studies/{t.study}/thumbnail", headers={"accept": "image/jpeg"})
    ),
    "WADO-URI application/dicom": lambda t: _wado_uri(t, "application/dicom"),
    "WADO-URI image/jpeg": lambda t: _wado_uri(t, "image/jpeg"),
}

#: What an added transaction gives through the proxy, for one image there.
_ADDED_RESULT: dict[str, Callable[[Target], Any]] = {
    "retrieve_bulkdata with a byte range": lambda t: [100],
    "WADO-URI application/dicom": lambda t: (200, t.instance),
    "WADO-URI image/jpeg": lambda t: (200, "image/jpeg"),
}


def _run(transaction: Transaction, target: Target) -> tuple[bool, Any]:
    try:
        return True, transaction(target)
    except (requests.RequestException, httpx.HTTPError, ValueError, KeyError) as exc:
        return False, type(exc).__name__


def _target(url: str, sop: str) -> Target:
    [row] = DICOMwebClient(url).search_for_instances(search_filters={"SOPInstanceUID": sop})
    return Target(url, row["0020000D"]["Value"][0], row["0020000E"]["Value"][0], sop)


@pytest.fixture(scope="module")
def mapped(archive: OrthancServer, store_path: Path, proxy_factory: ProxyFactory) -> ProxyServer:
    mapping = {"backend": "sqlite", "study_root": STUDY_ROOT, "series_root": SERIES_ROOT}
    return proxy_factory(archive.dicomweb_url, mapping=mapping, store={"path": str(store_path)})


@pytest.fixture(scope="module", params=["identity", "sqlite"])
def sides(
    request: pytest.FixtureRequest,
    proxy: ProxyServer,
    orthanc: OrthancServer,
    mapped: ProxyServer,
    archive: OrthancServer,
    samples: SampleSet,
) -> tuple[Target, Target]:
    """(direct, through the proxy) on one image of a small study."""
    sop = samples.small_studies[1].series[0].instances[0]
    if request.param == "identity":
        return _target(orthanc.dicomweb_url, sop), _target(proxy.dicomweb_url, sop)
    return _target(archive.dicomweb_url, sop), _target(mapped.dicomweb_url, sop)


@pytest.mark.parametrize("name", sorted(SERVED))
def test_what_passes_direct_passes_through_the_proxy(
    sides: tuple[Target, Target], name: str
) -> None:
    direct, through = sides
    ok, expected = _run(SERVED[name], direct)
    assert ok, f"{name} fails direct ({expected}): the matrix expects Orthanc to serve it"
    assert _run(SERVED[name], through) == (True, expected)


@pytest.mark.parametrize("name", sorted(ADDED))
def test_what_the_proxy_adds_passes_through_it(sides: tuple[Target, Target], name: str) -> None:
    _, through = sides
    ok, result = _run(ADDED[name], through)
    assert ok, f"{name} fails through the proxy: {result}"
    if name in _ADDED_RESULT:
        assert result == _ADDED_RESULT[name](through)


def test_delete_is_refused_on_purpose(sides: tuple[Target, Target]) -> None:
    _, through = sides
    with pytest.raises(requests.HTTPError) as error:
        through.client.delete_instance(*through.ids)
    assert error.value.response.status_code == 405
    assert _run(SERVED["retrieve_instance"], through)[0]
