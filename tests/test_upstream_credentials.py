"""The proxy's own credentials to the PACS ([upstream.auth] basic and bearer).

Client credentials against the real identity provider are in test_auth_idp.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from shanoir_dicomweb_proxy.testing import OrthancServer, SampleSet

from .support.faults import FaultServer
from .support.settings import ProxyFactory


@pytest.fixture(scope="module")
def secured_orthanc(
    tmp_path_factory: pytest.TempPathFactory, samples: SampleSet
) -> Iterator[OrthancServer]:
    extra = {"RegisteredUsers": {"proxy": "pacs-secret"}}
    with OrthancServer(tmp_path_factory.mktemp("secured"), extra_config=extra) as server:
        server.load(samples.files[:6])
        yield server


def test_basic_credentials_reach_orthanc(
    secured_orthanc: OrthancServer, proxy_factory: ProxyFactory
) -> None:
    assert httpx.get(secured_orthanc.dicomweb_url + "/studies").status_code == 401
    auth = {"type": "basic", "username": "proxy", "password": "pacs-secret"}
    proxy = proxy_factory(secured_orthanc.dicomweb_url, upstream={"auth": auth})
    response = httpx.get(proxy.dicomweb_url + "/studies")
    assert response.status_code == 200 and len(response.json()) >= 1


def test_wrong_credentials_are_the_proxy_s_problem(
    secured_orthanc: OrthancServer, proxy_factory: ProxyFactory
) -> None:
    auth = {"type": "basic", "username": "proxy", "password": "wrong"}
    proxy = proxy_factory(secured_orthanc.dicomweb_url, upstream={"auth": auth})
    response = httpx.get(proxy.dicomweb_url + "/studies")
    # Not a 401: the client's own credentials are fine, and the PACS's Basic challenge
    # must not make a browser prompt for the PACS password.
    assert response.status_code == 502
    assert "www-authenticate" not in response.headers
    assert response.json()["detail"] == "the upstream refused the proxy's own credentials"


def test_bearer_credentials(proxy_factory: ProxyFactory) -> None:
    fault = FaultServer(mode="json").start()
    try:
        proxy = proxy_factory(fault.url, upstream={"auth": {"type": "bearer", "token": "t0k3n"}})
        client_credentials = "Basic " + "x" * 8
        response = httpx.get(
            proxy.dicomweb_url + "/studies", headers={"authorization": client_credentials}
        )
        assert response.status_code == 200
        head = fault.last_request.decode().lower()
        assert "authorization: bearer t0k3n" in head
        # The proxy's credentials replace the client's: one Authorization, never theirs.
        assert head.count("authorization:") == 1
        assert client_credentials.lower() not in head and "x" * 8 not in head
    finally:
        fault.stop()
