"""Links and what a client says of the address it used (``Host``, ``Forwarded``,
``X-Forwarded-*``), through a real proxy process in front of Orthanc.

Without ``[server] public_url``, links in answers (RetrieveURL here) are built from the request.
Forwarded headers count only from ``[server] forwarded_allow_ips``; a ``Host`` that is not a host
name with an optional port, or is too long, is not used: no client steers links or grows answers.
"""

from __future__ import annotations

import httpx
import pytest

from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer

from .support.settings import ProxyFactory

RETRIEVE_URL = "00081190"
FORGED = {"x-forwarded-host": "evil.example", "x-forwarded-proto": "https"}


def _links(proxy: ProxyServer, headers: dict[str, str]) -> tuple[str, int]:
    """The RetrieveURL of the first study, and the answer's length."""
    response = httpx.get(
        f"{proxy.dicomweb_url}/studies",
        params={"limit": "1"},
        headers={"accept": "application/dicom+json", **headers},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()[0][RETRIEVE_URL]["Value"][0], len(response.content)


@pytest.fixture(scope="module")
def guarded(orthanc: OrthancServer, proxy_factory: ProxyFactory) -> ProxyServer:
    """A proxy that trusts forwarded headers from one reverse proxy, not from this test."""
    return proxy_factory(orthanc.dicomweb_url, server={"forwarded_allow_ips": ["192.0.2.10"]})


def test_forged_forwarded_headers_change_no_link(guarded: ProxyServer) -> None:
    plain, size = _links(guarded, {})
    assert plain.startswith(f"{guarded.dicomweb_url}/studies/")
    for forged in (FORGED, {"forwarded": 'host="evil.example";proto=https'}):
        assert _links(guarded, forged) == (plain, size)


def test_a_trusted_reverse_proxy_names_the_public_address(proxy: ProxyServer) -> None:
    # The default trusts the proxy's own machine, where this test runs.
    link, _ = _links(proxy, {"x-forwarded-host": "gw.example.org", "x-forwarded-proto": "https"})
    assert link.startswith("https://gw.example.org/dicomweb/studies/")


def test_a_huge_host_does_not_grow_answers(guarded: ProxyServer) -> None:
    plain, size = _links(guarded, {})
    link, huge_size = _links(guarded, {"host": "a" * 10_000})
    assert link == plain  # the socket's address instead
    assert huge_size == size
