"""Every DICOMweb transaction through the proxy, with the real Orthanc as the oracle.

What works direct must work through the proxy, byte for byte where bodies are not
rewritten; where they are (links), the only difference is the base URL.
"""

from __future__ import annotations

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer, SampleSet

from .support.dicomweb import DICOM, OCTET, XML, parts, relink


@pytest.fixture(scope="module")
def client(proxy: ProxyServer) -> DICOMwebClient:
    return DICOMwebClient(proxy.dicomweb_url)


@pytest.fixture(scope="module")
def direct(orthanc: OrthancServer) -> DICOMwebClient:
    return DICOMwebClient(orthanc.dicomweb_url)


def _uids(rows: list[dict[str, dict]], tag: str) -> list[str]:
    return [row[tag]["Value"][0] for row in rows]


def _study_path(samples: SampleSet, index: int = 1) -> tuple[str, str, str]:
    study = samples.small_studies[index]
    series = study.series[0]
    return study.uid, series.uid, series.instances[0]


# --- QIDO-RS ---------------------------------------------------------------------------


def test_search_studies_matches_direct(client: DICOMwebClient, direct: DICOMwebClient) -> None:
    through = client.search_for_studies()
    assert len(through) == 13
    assert _uids(through, "0020000D") == _uids(direct.search_for_studies(), "0020000D")


@pytest.mark.parametrize("level", ["series", "instances"])
def test_search_all_levels(
    client: DICOMwebClient, direct: DICOMwebClient, samples: SampleSet, level: str
) -> None:
    search = {"series": "search_for_series", "instances": "search_for_instances"}[level]
    tag = {"series": "0020000E", "instances": "00080018"}[level]
    through = getattr(client, search)()
    assert _uids(through, tag) == _uids(getattr(direct, search)(), tag)
    expected = samples.all_series_uids() if level == "series" else samples.all_instance_uids()
    assert sorted(_uids(through, tag)) == sorted(expected)


def test_search_in_study_and_series(client: DICOMwebClient, samples: SampleSet) -> None:
    study = samples.small_studies[0]
    series = client.search_for_series(study.uid)
    assert sorted(_uids(series, "0020000E")) == sorted(s.uid for s in study.series)
    instances = client.search_for_instances(study.uid)
    assert len(instances) == sum(len(s.instances) for s in study.series)
    one = study.series[0]
    in_series = client.search_for_instances(study.uid, one.uid)
    assert sorted(_uids(in_series, "00080018")) == sorted(one.instances)


def test_paging_and_includefield(client: DICOMwebClient, direct: DICOMwebClient) -> None:
    everything = _uids(client.search_for_studies(), "0020000D")
    pages = [
        _uids(client.search_for_studies(limit=5, offset=offset), "0020000D")
        for offset in (0, 5, 10)
    ]
    assert [len(p) for p in pages] == [5, 5, 3]
    assert sum(pages, []) == everything
    fields = ["StudyDescription", "00080060"]
    through = client.search_for_studies(limit=2, fields=fields)
    without = client.search_for_studies(limit=2)
    assert [sorted(row) for row in through] == [
        sorted(row) for row in direct.search_for_studies(limit=2, fields=fields)
    ]
    assert all("00081030" in row for row in through)
    assert not any("00081030" in row for row in without)


def test_wildcards_work_where_orthanc_alone_fails(
    client: DICOMwebClient, direct: DICOMwebClient, samples: SampleSet
) -> None:
    # dicomweb-client percent-encodes "*" as %2A; Orthanc does not decode it, the proxy does.
    patient = samples.small_studies[0].patient_id
    expected = sorted(s.uid for s in samples.studies if s.patient_id == patient)
    assert direct.search_for_studies(search_filters={"PatientID": patient[:-1] + "*"}) == []
    through = client.search_for_studies(search_filters={"PatientID": patient[:-1] + "*"})
    assert sorted(_uids(through, "0020000D")) == sorted(
        s.uid for s in samples.studies if s.patient_id.startswith(patient[:-1])
    )
    exact = client.search_for_studies(search_filters={"PatientID": patient})
    assert sorted(_uids(exact, "0020000D")) == expected


def test_comma_includefield_and_pn_caret(proxy: ProxyServer, samples: SampleSet) -> None:
    # OHIF sends includefield as one encoded comma list; a PN with "^" must match too.
    study = samples.small_studies[2]
    family = study.patient_name.split("^")[0]
    response = httpx.get(
        f"{proxy.dicomweb_url}/studies",
        params={"PatientName": f"{family}^*", "includefield": "00081030,00080060"},
    )
    assert response.status_code == 200
    rows = response.json()
    assert study.uid in _uids(rows, "0020000D")
    assert all("00081030" in row for row in rows)


def test_empty_search_answers_like_upstream(proxy: ProxyServer, orthanc: OrthancServer) -> None:
    params = {"PatientID": "NOBODY"}
    through = httpx.get(f"{proxy.dicomweb_url}/studies", params=params)
    direct = httpx.get(f"{orthanc.dicomweb_url}/studies", params=params)
    assert (through.status_code, through.content) == (direct.status_code, direct.content)


def test_qido_xml(proxy: ProxyServer, samples: SampleSet) -> None:
    response = httpx.get(
        f"{proxy.dicomweb_url}/studies", headers={"accept": "application/dicom+xml"}
    )
    assert response.status_code == 200
    body = response.content
    assert b"NativeDicomModel" in body
    assert all(uid.encode() in body for uid in samples.all_study_uids())


# --- WADO-RS: retrieve -----------------------------------------------------------------


def test_retrieve_instance_byte_for_byte(
    proxy: ProxyServer, orthanc: OrthancServer, samples: SampleSet
) -> None:
    study, series, instance = _study_path(samples)
    path = f"/studies/{study}/series/{series}/instances/{instance}"
    through = httpx.get(proxy.dicomweb_url + path, headers={"accept": DICOM})
    direct = httpx.get(orthanc.dicomweb_url + path, headers={"accept": DICOM})
    assert through.status_code == direct.status_code == 200
    assert [b for _, b in parts(through)] == [b for _, b in parts(direct)]
    assert pydicom.dcmread(samples.files[0]).SOPInstanceUID  # sanity: samples readable


@pytest.mark.parametrize("level", ["study", "series"])
def test_retrieve_study_and_series(
    client: DICOMwebClient, direct: DICOMwebClient, samples: SampleSet, level: str
) -> None:
    study = samples.small_studies[0]
    if level == "study":
        through, expected = client.retrieve_study(study.uid), direct.retrieve_study(study.uid)
    else:
        uid = study.series[0].uid
        through = client.retrieve_series(study.uid, uid)
        expected = direct.retrieve_series(study.uid, uid)
    assert len(through) == len(expected) > 0
    key = lambda ds: ds.SOPInstanceUID  # noqa: E731
    for a, b in zip(sorted(through, key=key), sorted(expected, key=key), strict=True):
        assert a == b


def test_iter_series_streams(client: DICOMwebClient, samples: SampleSet) -> None:
    study = samples.small_studies[3]
    series = study.series[1]
    sops = sorted(ds.SOPInstanceUID for ds in client.iter_series(study.uid, series.uid))
    assert sops == sorted(series.instances)


def test_large_instance(proxy: ProxyServer, samples: SampleSet) -> None:
    large = samples.large
    path = f"/studies/{large.study_uid}/series/{large.series_uid}/instances/{large.sop_uid}"
    with httpx.stream("GET", proxy.dicomweb_url + path, headers={"accept": DICOM}) as response:
        assert response.status_code == 200
        size = sum(len(chunk) for chunk in response.iter_raw())
    assert size > large.path.stat().st_size  # the file plus multipart framing


# --- WADO-RS: metadata -----------------------------------------------------------------


@pytest.mark.parametrize("level", ["study", "series", "instance"])
def test_metadata_all_levels(
    proxy: ProxyServer, orthanc: OrthancServer, samples: SampleSet, level: str
) -> None:
    study, series, instance = _study_path(samples)
    path = {
        "study": f"/studies/{study}/metadata",
        "series": f"/studies/{study}/series/{series}/metadata",
        "instance": f"/studies/{study}/series/{series}/instances/{instance}/metadata",
    }[level]
    through = httpx.get(proxy.dicomweb_url + path)
    direct = httpx.get(orthanc.dicomweb_url + path)
    assert through.status_code == direct.status_code == 200
    assert through.content == relink(direct.content, orthanc.dicomweb_url, proxy.dicomweb_url)
    assert orthanc.dicomweb_url.encode() not in through.content


def test_metadata_xml_parts_keep_valid_lengths(
    proxy: ProxyServer, orthanc: OrthancServer, samples: SampleSet
) -> None:
    study, series, _ = _study_path(samples)
    path = f"/studies/{study}/series/{series}/metadata"
    through = parts(httpx.get(proxy.dicomweb_url + path, headers={"accept": XML}))
    direct = parts(httpx.get(orthanc.dicomweb_url + path, headers={"accept": XML}))
    assert len(through) == len(direct) == 3
    for (headers, body), (_, expected) in zip(through, direct, strict=True):
        assert int(headers["content-length"]) == len(body)
        assert body == relink(expected, orthanc.dicomweb_url, proxy.dicomweb_url)
        assert b"<NativeDicomModel" in body


def test_bulkdata_uri_is_usable(client: DICOMwebClient, samples: SampleSet) -> None:
    study, series, instance = _study_path(samples)
    metadata = client.retrieve_instance_metadata(study, series, instance)
    uri = metadata["7FE00010"]["BulkDataURI"]
    # dicomweb-client sends Host without the port: the link must still reach the proxy.
    assert uri.startswith(client.base_url + "/")
    data = client.retrieve_bulkdata(uri, media_types=("application/octet-stream",))
    assert len(data[0]) == 64 * 64 * 2


def test_retrieve_url_points_at_proxy(client: DICOMwebClient, samples: SampleSet) -> None:
    rows = client.search_for_studies(limit=1)
    url = rows[0]["00081190"]["Value"][0]
    assert url.startswith(client.base_url + "/studies/")


# --- WADO-RS: frames, rendered, thumbnail -----------------------------------------------


def test_frames(client: DICOMwebClient, samples: SampleSet) -> None:
    large = samples.large
    frames = client.retrieve_instance_frames(
        large.study_uid,
        large.series_uid,
        large.sop_uid,
        [1, 55, 110],
        media_types=("application/octet-stream",),
    )
    assert frames == [large.frame(1), large.frame(55), large.frame(110)]


def test_frames_with_unquoted_type(proxy: ProxyServer, samples: SampleSet) -> None:
    large = samples.large
    path = (
        f"/studies/{large.study_uid}/series/{large.series_uid}/instances/{large.sop_uid}/frames/2"
    )
    accept = "multipart/related; type=application/octet-stream; transfer-syntax=*"
    response = httpx.get(proxy.dicomweb_url + path, headers={"accept": accept})
    assert response.status_code == 200
    ((headers, body),) = parts(response)
    assert body == large.frame(2)
    # Orthanc names the part's own URL: it points at the proxy, not the upstream.
    assert headers["content-location"] == proxy.dicomweb_url + path


@pytest.mark.parametrize("media", ["image/jpeg", "image/png"])
def test_rendered_every_level(client: DICOMwebClient, samples: SampleSet, media: str) -> None:
    study, series, instance = _study_path(samples)
    magic = {"image/jpeg": b"\xff\xd8", "image/png": b"\x89PNG"}[media]
    images = [
        client.retrieve_instance_rendered(study, series, instance, media_types=(media,)),
        client.retrieve_instance_frames_rendered(
            study, series, instance, [1], media_types=(media,)
        ),
        client.retrieve_series_rendered(study, series, media_types=(media,)),
    ]
    assert all(image.startswith(magic) for image in images)


def test_rendered_parameters(
    proxy: ProxyServer, orthanc: OrthancServer, samples: SampleSet
) -> None:
    study, series, instance = _study_path(samples)
    path = f"/studies/{study}/series/{series}/instances/{instance}/rendered"
    params = {"viewport": "32,32", "quality": "80", "window": "100,200,linear"}
    through = httpx.get(proxy.dicomweb_url + path, params=params, headers={"accept": "image/png"})
    # Direct, the comma must be sent literally: Orthanc does not decode %2C.
    query = "viewport=32,32&quality=80&window=100,200,linear"
    direct = httpx.get(f"{orthanc.dicomweb_url}{path}?{query}", headers={"accept": "image/png"})
    assert through.status_code == direct.status_code == 200
    assert through.content == direct.content


def test_study_rendered_passes_the_upstream_answer(
    proxy: ProxyServer, orthanc: OrthancServer, samples: SampleSet
) -> None:
    """(Thumbnails, which Orthanc lacks, are in test_upstream_adapt.py.)"""
    study, _, _ = _study_path(samples)
    path = f"/studies/{study}/rendered"
    through = httpx.get(proxy.dicomweb_url + path, headers={"accept": "image/jpeg"})
    direct = httpx.get(orthanc.dicomweb_url + path, headers={"accept": "image/jpeg"})
    assert through.status_code == direct.status_code == 200
    assert through.content == direct.content


def test_wado_uri(proxy: ProxyServer, orthanc: OrthancServer, samples: SampleSet) -> None:
    """WADO-URI (PS3.18 §9), as OHIF's wadoUriRoot and older scripts use it: served from the
    WADO-RS resources, whatever the PACS's own WADO-URI does (Orthanc's labels JPEG as PNG)."""
    study, series, instance = _study_path(samples)
    wado = f"{proxy.dicomweb_url}/wado?requestType=WADO&studyUID={study}&seriesUID={series}"
    wado += f"&objectUID={instance}"
    part10 = httpx.get(wado + "&contentType=application%2Fdicom")
    assert part10.status_code == 200
    assert part10.headers["content-type"] == "application/dicom"
    path = f"/studies/{study}/series/{series}/instances/{instance}"
    [(_, direct)] = parts(httpx.get(orthanc.dicomweb_url + path, headers={"accept": DICOM}))
    assert part10.content == direct
    image = httpx.get(wado)  # contentType defaults to image/jpeg
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/jpeg"
    assert image.content.startswith(b"\xff\xd8")
    small = httpx.get(wado + "&contentType=image/png&rows=16&columns=16")
    rendered = httpx.get(
        f"{orthanc.dicomweb_url}{path}/rendered?viewport=16,16", headers={"accept": "image/png"}
    )
    assert small.content == rendered.content
    unknown = instance[:-1] + ("1" if instance[-1] != "1" else "2")
    assert httpx.get(wado.replace(instance, unknown)).status_code == 404
    refused = httpx.get(wado + "&anonymize=yes")
    assert refused.status_code == 400
    assert refused.headers["content-type"] == "application/problem+json"


# --- HTTP semantics ----------------------------------------------------------------------


def test_head_gives_headers_only(proxy: ProxyServer, samples: SampleSet) -> None:
    study, series, instance = _study_path(samples)
    path = f"/studies/{study}/series/{series}/instances/{instance}/frames/1"
    get = httpx.get(proxy.dicomweb_url + path, headers={"accept": OCTET})
    head = httpx.head(proxy.dicomweb_url + path, headers={"accept": OCTET})
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"].split(";")[0] == "multipart/related"
    # The parts' Content-Location is rewritten, so neither says a Content-Length.
    assert head.headers.get("content-length") == get.headers.get("content-length")
    assert head.headers.get("transfer-encoding") == get.headers.get("transfer-encoding")


def test_options_answers_allow(proxy: ProxyServer) -> None:
    studies = httpx.options(proxy.dicomweb_url + "/studies")
    assert studies.status_code == 204
    assert studies.headers["allow"] == "GET, HEAD, POST, OPTIONS"
    series = httpx.options(proxy.dicomweb_url + "/series")
    assert series.headers["allow"] == "GET, HEAD, OPTIONS"


def test_h2c_prior_knowledge(proxy: ProxyServer) -> None:
    with httpx.Client(http1=False, http2=True) as h2:
        response = h2.get(proxy.dicomweb_url + "/studies", params={"limit": "1"})
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200 and len(response.json()) == 1


def test_unknown_uid_is_404_problem(proxy: ProxyServer) -> None:
    response = httpx.get(proxy.dicomweb_url + "/studies/1.2.3.4.5/metadata")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 404
