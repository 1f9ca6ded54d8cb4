"""What the proxy adds to a PACS that lacks it, with the real Orthanc (DICOMweb plugin 1.7),
which fails each of these alone: thumbnails, dicomweb-client's default Accept for frames and
bulk data, single-part answers, byte ranges of bulk data."""

from __future__ import annotations

import io

import httpx
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer, SampleSet

from .support.dicomweb import DICOM, parts


def _instance(samples: SampleSet) -> str:
    large = samples.large
    return f"/studies/{large.study_uid}/series/{large.series_uid}/instances/{large.sop_uid}"


def test_thumbnails_are_rendered_with_a_thumbnail_viewport(
    proxy: ProxyServer, orthanc: OrthancServer, samples: SampleSet
) -> None:
    study = samples.small_studies[1]
    series, instance = study.series[0].uid, study.series[0].instances[0]
    for path in (
        f"/studies/{study.uid}",
        f"/studies/{study.uid}/series/{series}",
        f"/studies/{study.uid}/series/{series}/instances/{instance}",
        f"/studies/{study.uid}/series/{series}/instances/{instance}/frames/1",
    ):
        accept = {"accept": "image/jpeg"}
        assert httpx.get(orthanc.dicomweb_url + path + "/thumbnail", headers=accept).is_error
        through = httpx.get(proxy.dicomweb_url + path + "/thumbnail", headers=accept)
        assert through.status_code == 200, path
        assert through.headers["content-type"] == "image/jpeg"
        rendered = httpx.get(
            f"{orthanc.dicomweb_url}{path}/rendered?viewport=128,128", headers=accept
        )
        assert through.content == rendered.content
    # A viewport the client gives is kept.
    small = httpx.get(
        f"{proxy.dicomweb_url}/studies/{study.uid}/thumbnail",
        params={"viewport": "16,16"},
        headers={"accept": "image/png"},
    )
    direct = httpx.get(
        f"{orthanc.dicomweb_url}/studies/{study.uid}/rendered?viewport=16,16",
        headers={"accept": "image/png"},
    )
    assert small.status_code == 200 and small.content == direct.content


def test_dicomweb_clients_default_accept_for_frames_and_bulk_data(
    proxy: ProxyServer, orthanc: OrthancServer, samples: SampleSet
) -> None:
    """dicomweb-client asks for frames and bulk data as multipart/related; type="*/*" unless
    told otherwise: Orthanc answers 400, the proxy the frames."""
    large = samples.large
    uids = (large.study_uid, large.series_uid, large.sop_uid)
    with pytest.raises(requests.HTTPError):
        DICOMwebClient(orthanc.dicomweb_url).retrieve_instance_frames(*uids, [1])
    client = DICOMwebClient(proxy.dicomweb_url)
    assert client.retrieve_instance_frames(*uids, [2, 3]) == [large.frame(2), large.frame(3)]
    bulk = f"{proxy.dicomweb_url}{_instance(samples)}/bulk/7fe00010"
    [value] = client.retrieve_bulkdata(bulk)
    assert len(value) == large.pixel_bytes
    assert value[: large.frame_bytes] == large.frame(1)


def test_single_part_answers(
    proxy: ProxyServer, orthanc: OrthancServer, samples: SampleSet
) -> None:
    """An instance as application/dicom, a frame or bulk data as application/octet-stream:
    Orthanc only answers multipart (400), the proxy the one part as the body."""
    large, base = samples.large, proxy.dicomweb_url + _instance(samples)
    octets = {"accept": "application/octet-stream"}
    assert httpx.get(
        orthanc.dicomweb_url + _instance(samples) + "/frames/1", headers=octets
    ).is_error
    frame = httpx.get(base + "/frames/7", headers=octets)
    assert frame.status_code == 200
    assert frame.headers["content-type"].startswith("application/octet-stream")
    assert frame.headers["content-length"] == str(large.frame_bytes)
    assert frame.content == large.frame(7)
    bulk = httpx.get(base + "/bulk/7fe00010", headers=octets, timeout=60)
    assert bulk.status_code == 200 and len(bulk.content) == large.pixel_bytes
    small = samples.small_studies[0]
    sop = small.series[0].instances[0]
    path = f"/studies/{small.uid}/series/{small.series[0].uid}/instances/{sop}"
    single = httpx.get(proxy.dicomweb_url + path, headers={"accept": "application/dicom"})
    assert single.status_code == 200
    assert single.headers["content-type"] == "application/dicom"
    [(_, direct)] = parts(httpx.get(orthanc.dicomweb_url + path, headers={"accept": DICOM}))
    assert single.content == direct
    assert (
        pydicom.dcmread(io.BytesIO(single.content)).SOPInstanceUID == small.series[0].instances[0]
    )
    # Several frames cannot be one body: the upstream's refusal, not a wrong answer.
    several = httpx.get(base + "/frames/1,2", headers=octets)
    assert several.is_error


def test_byte_ranges_of_bulk_data(
    proxy: ProxyServer, orthanc: OrthancServer, samples: SampleSet
) -> None:
    large = samples.large
    url = proxy.dicomweb_url + _instance(samples) + "/bulk/7fe00010"
    first = large.frame(1)
    octets = {"accept": "application/octet-stream"}
    direct = httpx.get(
        orthanc.dicomweb_url + _instance(samples) + "/bulk/7fe00010",
        headers={
            "accept": 'multipart/related; type="application/octet-stream"',
            "range": "bytes=0-99",
        },
        timeout=60,
    )
    assert direct.status_code == 200  # Orthanc ignores Range
    ranged = httpx.get(url, headers={**octets, "range": "bytes=10-109"}, timeout=60)
    assert ranged.status_code == 206
    assert ranged.content == first[10:110]
    assert ranged.headers["content-range"] == f"bytes 10-109/{large.pixel_bytes}"
    assert ranged.headers["content-length"] == "100"
    tail = httpx.get(
        url, headers={**octets, "range": f"bytes={large.pixel_bytes - 5}-"}, timeout=60
    )
    assert tail.status_code == 206 and tail.content == large.frame(large.frames)[-5:]
    past = httpx.get(url, headers={**octets, "range": f"bytes={large.pixel_bytes}-"}, timeout=60)
    assert past.status_code == 416
    assert past.headers["content-type"] == "application/problem+json"
    assert past.headers["content-range"] == f"bytes */{large.pixel_bytes}"
    # In a multipart answer the range is of the value in the part, as dicomweb-client reads it.
    client = DICOMwebClient(proxy.dicomweb_url)
    [value] = client.retrieve_bulkdata(url, byte_range=(0, 99))
    assert value == first[:100]
    # Several ranges are ignored (RFC 9110 §14.2): the whole value.
    whole = httpx.get(url, headers={**octets, "range": "bytes=0-1,5-6"}, timeout=60)
    assert whole.status_code == 200 and len(whole.content) == large.pixel_bytes


BROWSER_ACCEPT = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"
)
IMG_ACCEPT = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"


def test_rendered_images_for_a_browser(
    proxy: ProxyServer, orthanc: OrthancServer, samples: SampleSet
) -> None:
    """A new tab or an <img> sends the browser's Accept list, which Orthanc refuses (400):
    the proxy asks for the first type it accepts that a PACS renders, JPEG for a wildcard."""
    study = samples.small_studies[1]
    series, instance = study.series[0].uid, study.series[0].instances[0]
    path = f"/studies/{study.uid}/series/{series}/instances/{instance}/rendered"
    assert httpx.get(orthanc.dicomweb_url + path, headers={"accept": BROWSER_ACCEPT}).is_error
    jpeg = httpx.get(orthanc.dicomweb_url + path, headers={"accept": "image/jpeg"})
    for accept in (BROWSER_ACCEPT, IMG_ACCEPT):
        through = httpx.get(proxy.dicomweb_url + path, headers={"accept": accept})
        assert through.status_code == 200, accept
        assert through.headers["content-type"] == "image/jpeg"
        assert through.content == jpeg.content
    png = httpx.get(proxy.dicomweb_url + path, headers={"accept": "image/webp, image/png;q=0.9"})
    assert png.headers["content-type"] == "image/png"
