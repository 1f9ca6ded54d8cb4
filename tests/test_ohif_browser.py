"""OHIF 3 in a real browser through the proxy: Chromium logs in with the authorization code
flow and PKCE, lists the caller's examinations and renders one, the proxy on another origin
than the viewer (CORS for real), with identifier translation and per-examination access, in
front of the real Orthanc."""

from __future__ import annotations

import base64
import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Request, Response, sync_playwright

from shanoir_dicomweb_proxy._store import SqliteStore
from shanoir_dicomweb_proxy.testing import OrthancServer, ProxyServer, SampleSet

from .support.archive import SERIES_ROOT, STUDY_ROOT
from .support.browser import (
    CHROMIUM_ARGS,
    ViewerSite,
    artifacts_dir,
    chromium_executable,
    ohif_dist,
)
from .support.idp import OIDC_PATH, USERS, IdentityProvider
from .support.keys import link_key_file
from .support.loopback_http import running
from .support.settings import CORE_SETTINGS

pytestmark = pytest.mark.browser

#: The examinations each user may read, by accession number (the study list shows it).
GRANTS = {"alice": ("ACC00003", "ACC00005"), "bob": ("ACC00002", "ACC00004", "ACC00008")}
TTL = 300  # seconds: access tokens outlive the tests, but those of the expiry test
EXPIRING = 8
AUDIENCE = "dicomweb-proxy"
ROOTS = {"study_root": STUDY_ROOT, "series_root": SERIES_ROOT}


def app_config(proxy: ProxyServer, idp: IdentityProvider) -> dict[str, Any]:
    """OHIF's configuration through the proxy, as docs/ohif.md gives it."""
    return {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "shanoir",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "shanoir",
                "configuration": {
                    "friendlyName": "Shanoir-NG",
                    "name": "shanoir",
                    "qidoRoot": proxy.dicomweb_url,
                    "wadoRoot": proxy.dicomweb_url,
                    "wadoUriRoot": proxy.dicomweb_url,
                    "qidoSupportsIncludeField": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "omitQuotationForMultipartRequest": True,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "bulkDataURI": {"enabled": True},
                },
            }
        ],
        "oidc": [
            {
                "authority": idp.issuer,
                "client_id": "ohif-viewer",
                "redirect_uri": "/callback",
                "post_logout_redirect_uri": "/",
                "response_type": "code",
                "scope": "openid",
            }
        ],
    }


@dataclass
class Site:
    viewer: ViewerSite
    idp: IdentityProvider
    proxy: ProxyServer
    accessions: dict[str, str]  # public study UID -> accession number
    screenshots: Path


@pytest.fixture(scope="module")
def site(
    pytestconfig: pytest.Config,
    tmp_path_factory: pytest.TempPathFactory,
    archive: OrthancServer,
    store_path: Path,
    samples: SampleSet,
) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("ohif")
    store = folder / "store.sqlite3"
    shutil.copy(store_path, store)
    accession = {study.uid: study.accession_number for study in samples.small_studies}
    accessions: dict[str, str] = {}
    with SqliteStore(store) as opened:
        for entry in opened.entries():
            public = f"{STUDY_ROOT}.{entry.exam_id}"
            if entry.study_uid in accession:
                accessions[public] = accession[entry.study_uid]
            for user, granted in GRANTS.items():
                if accessions.get(public) in granted:
                    assert opened.grant(str(USERS[user][1]), entry.exam_id, "read")
    with running(ViewerSite(ohif_dist())) as viewer:
        with IdentityProvider(folder / "idp", ttl=TTL, viewer_origins=[viewer.origin]) as idp:
            settings = {
                **CORE_SETTINGS,
                "upstream": {"url": archive.dicomweb_url},
                "auth": {
                    "enabled": True,
                    "issuer": idp.issuer,
                    "audience": [AUDIENCE],
                    "leeway": 0,
                },
                "mapping": {"backend": "sqlite", **ROOTS},
                "access": {"backend": "sqlite"},
                "store": {"path": str(store)},
                "cors": {"allow_origins": [viewer.origin]},
                "links": {
                    "enabled": True,
                    "keys_file": str(link_key_file(folder / "link-keys.json")),
                },
            }
            with ProxyServer(folder / "proxy", settings) as proxy:
                viewer.configure(app_config(proxy, idp))
                screenshots = artifacts_dir(pytestconfig, tmp_path_factory, "ohif-screenshots")
                yield Site(viewer, idp, proxy, accessions, screenshots)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = chromium_executable()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@dataclass
class Session:
    """One user's browser context, and what it asked the proxy and the provider."""

    context: BrowserContext
    page: Page
    proxy: list[Response] = field(default_factory=list)  # every answer of the proxy
    failures: list[str] = field(default_factory=list)  # proxy requests left unanswered
    authorizations: list[str] = field(default_factory=list)  # authorization request URLs
    token_requests: list[str] = field(default_factory=list)  # their form bodies
    login_forms: int = 0  # login pages the provider showed

    def screenshot(self, site: Site, name: str) -> None:
        self.page.screenshot(path=site.screenshots / f"{name}.png")


def _open(browser: Browser, site: Site, config: dict[str, Any] | None = None) -> Session:
    """A new browser context (fresh storage); ``config`` replaces the site's app-config.js."""
    context = browser.new_context(service_workers="block", viewport={"width": 1400, "height": 900})
    # The viewer's first-visit tour would hide half of each screenshot.
    context.add_init_script("localStorage.setItem('shownTours', '[\"basicViewerTour\"]');")
    if config is not None:
        script = f"window.config = {json.dumps(config)};"
        context.route(
            f"{site.viewer.origin}/app-config.js",
            lambda route: route.fulfill(body=script, content_type="text/javascript"),
        )
    session = Session(context, context.new_page())
    proxy, oidc = site.proxy.dicomweb_url, site.idp.issuer + OIDC_PATH

    def answered(response: Response) -> None:
        if response.url.startswith(proxy):
            session.proxy.append(response)

    def requested(request: Request) -> None:
        if request.url.startswith(oidc + "/auth?"):
            session.authorizations.append(request.url)
        elif request.url == oidc + "/token":
            session.token_requests.append(request.post_data or "")
        elif request.url.startswith(site.idp.issuer + "/interaction/") and request.method == "GET":
            session.login_forms += 1

    def failed(request: Request) -> None:
        if request.url.startswith(proxy):
            session.failures.append(f"{request.method} {request.url}: {request.failure}")

    context.on("response", answered)
    context.on("request", requested)
    context.on("requestfailed", failed)
    return session


def _log_in(site: Site, session: Session, user: str) -> Response:
    """Open the viewer, log in on the provider's form; the study list's search answer."""
    page = session.page
    page.goto(site.viewer.origin + "/")
    page.wait_for_selector("#username")  # redirected to the provider's login form
    page.fill("#username", user)
    page.fill("#password", USERS[user][0])
    with page.expect_response(
        lambda r: r.url.startswith(site.proxy.dicomweb_url + "/studies?")
    ) as search:
        page.click("#kc-login")
    return search.value


def _listed(page: Page) -> list[str]:
    """The accession numbers of the study list's rows, once it is shown."""
    rows = page.locator("tr[aria-selected]")
    rows.first.wait_for()
    return sorted(re.findall(r"ACC\d+", " ".join(rows.all_inner_texts())))


def _public_uids(search: Response) -> set[str]:
    return {row["0020000D"]["Value"][0] for row in search.json()}


def _check_answers(site: Site, session: Session) -> None:
    """Every request to the proxy was answered 2xx, read across origins, with a token."""
    assert session.proxy and not session.failures, session.failures
    for response in session.proxy:
        request = response.request
        assert 200 <= response.status < 300, (request.method, response.url, response.status)
        assert response.header_value("access-control-allow-origin") == site.viewer.origin
        assert (request.header_value("authorization") or "").startswith("Bearer ey"), response.url


@pytest.fixture(scope="module")
def alice(browser: Browser, site: Site) -> Iterator[tuple[Session, Response]]:
    session = _open(browser, site)
    search = _log_in(site, session, "alice")
    yield session, search
    session.context.close()


def _accessions(site: Site, uids: set[str]) -> list[str]:
    return sorted(site.accessions[uid] for uid in uids)


def test_login_with_pkce_lists_only_the_callers_examinations(
    site: Site, alice: tuple[Session, Response]
) -> None:
    session, search = alice
    # The authorization code flow with PKCE, by OHIF's own oidc settings.
    assert len(session.authorizations) == 1 and session.login_forms == 1
    asked = parse_qs(urlsplit(session.authorizations[0]).query)
    assert asked["client_id"] == ["ohif-viewer"] and asked["response_type"] == ["code"]
    assert asked["code_challenge_method"] == ["S256"] and asked["code_challenge"]
    assert asked["redirect_uri"] == [site.viewer.origin + "/callback"]
    token = parse_qs(session.token_requests[-1])
    assert token["grant_type"] == ["authorization_code"] and token["code_verifier"]
    # What the proxy answered, and what the list shows: the caller's examinations only.
    assert search.status == 200
    assert _accessions(site, _public_uids(search)) == sorted(GRANTS["alice"])
    assert _listed(session.page) == sorted(GRANTS["alice"])
    session.screenshot(site, "1-alice-study-list")
    _check_answers(site, session)


_RENDERED = """() => {
  const canvas = document.querySelector('[data-cy="viewport-pane"] canvas.cornerstone-canvas');
  if (!canvas || !canvas.width || !canvas.height) return null;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let lit = 0;
  const levels = new Set();
  for (let i = 0; i < data.length; i += 4) {
    if (data[i] + data[i + 1] + data[i + 2] > 48) lit += 1;
    levels.add(data[i]);
  }
  return { lit: lit / (data.length / 4), levels: levels.size };
}"""
#: Waits until the viewport shows an image: more than 5 % lit, more than 16 grey levels.
_RENDERED_ENOUGH = (
    f"(() => {{ const r = ({_RENDERED})(); return r && r.lit > 0.05 && r.levels > 16 && r; }})"
)


def test_a_study_opens_and_renders(site: Site, alice: tuple[Session, Response]) -> None:
    session, search = alice
    study = min(_public_uids(search))
    page = session.page
    # A link to a study by its public UID (a new page load: OHIF logs in again, silently).
    page.goto(f"{site.viewer.origin}/viewer?StudyInstanceUIDs={study}")
    rendered = page.wait_for_function(_RENDERED_ENOUGH, timeout=60_000).json_value()
    assert rendered["lit"] > 0.05 and rendered["levels"] > 16, rendered
    assert page.locator(".infinite-loading-bar").count() == 0  # not the loading overlay
    assert len(session.authorizations) == 2  # the new page load went to the provider again
    assert session.login_forms == 1  # and logged in without asking for the password again
    session.screenshot(site, "2-alice-viewer")
    paths = [urlsplit(r.url).path for r in session.proxy]
    base = urlsplit(site.proxy.dicomweb_url).path
    assert f"{base}/studies/{study}/series" in paths
    assert any(
        p.startswith(f"{base}/studies/{study}/series/") and p.endswith("/metadata") for p in paths
    )
    assert any(p.startswith(f"{base}/studies/{study}/series/") and "/frames/" in p for p in paths)
    _check_answers(site, session)


def test_a_second_user_sees_a_different_list(browser: Browser, site: Site) -> None:
    session = _open(browser, site)
    try:
        search = _log_in(site, session, "bob")
        assert search.status == 200
        assert _accessions(site, _public_uids(search)) == sorted(GRANTS["bob"])
        assert _listed(session.page) == sorted(GRANTS["bob"])
        session.screenshot(site, "3-bob-study-list")
        _check_answers(site, session)
    finally:
        session.context.close()


def test_a_signed_link_opens_its_study_with_no_login(browser: Browser, site: Site) -> None:
    """A shared link: OHIF with the link's URL as its DICOMweb root, no oidc, opens and renders
    the study with no header at all; nothing else is readable through it."""
    token = site.idp.password_token("alice")
    search = httpx.get(
        site.proxy.dicomweb_url + "/studies", headers={"authorization": f"Bearer {token}"}
    )
    study = min(row["0020000D"]["Value"][0] for row in search.json())
    made = httpx.post(
        site.proxy.dicomweb_url + "/links",
        json={"study": study, "ttl": 300},
        headers={"authorization": f"Bearer {token}"},
    )
    assert made.status_code == 201, made.text
    link = made.json()["url"]
    config = app_config(site.proxy, site.idp)
    del config["oidc"]
    source = config["dataSources"][0]["configuration"]
    source["qidoRoot"] = source["wadoRoot"] = source["wadoUriRoot"] = link
    session = _open(browser, site, config)
    try:
        page = session.page
        page.goto(f"{site.viewer.origin}/viewer?StudyInstanceUIDs={study}")
        rendered = page.wait_for_function(_RENDERED_ENOUGH, timeout=60_000).json_value()
        assert rendered["lit"] > 0.05 and rendered["levels"] > 16, rendered
        assert session.authorizations == [] and session.login_forms == 0  # no login at all
        session.screenshot(site, "5-signed-link-viewer")
        assert session.proxy and not session.failures, session.failures
        for response in session.proxy:
            request = response.request
            assert response.url.startswith(link + "/"), response.url
            assert 200 <= response.status < 300, (request.method, response.url, response.status)
            assert request.header_value("authorization") is None
        assert any("/frames/" in r.url for r in session.proxy)
    finally:
        session.context.close()


def test_a_signed_link_opens_an_image_and_a_wado_uri_object_in_a_tab(
    browser: Browser, site: Site
) -> None:
    """What an <img>, a new tab or a download link does with a signed link: no header at all.
    The same link fails for a second study, and after it expires."""
    token = site.idp.password_token("alice")
    bearer = {"authorization": f"Bearer {token}"}
    studies = sorted(
        row["0020000D"]["Value"][0]
        for row in httpx.get(site.proxy.dicomweb_url + "/studies", headers=bearer).json()
    )
    study, second = studies[0], studies[1]
    made = httpx.post(
        site.proxy.dicomweb_url + "/links", json={"study": study, "ttl": 4}, headers=bearer
    )
    link = made.json()["url"]
    row = httpx.get(f"{site.proxy.dicomweb_url}/studies/{study}/instances", headers=bearer)
    series, sop = row.json()[0]["0020000E"]["Value"][0], row.json()[0]["00080018"]["Value"][0]
    rendered = f"{link}/studies/{study}/series/{series}/instances/{sop}/rendered"
    wado = f"{link}/wado?requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={sop}"
    context = browser.new_context()
    try:
        tab = context.new_page()
        image = tab.goto(rendered)
        assert image is not None and image.status == 200
        assert image.header_value("content-type") == "image/jpeg"
        assert image.request.header_value("authorization") is None
        assert tab.evaluate("document.images.length === 1 && document.images[0].naturalWidth") > 0
        jpeg = tab.goto(wado + "&contentType=image/jpeg")
        assert jpeg is not None and jpeg.status == 200
        with tab.expect_download() as download:  # application/dicom: the browser saves it
            tab.evaluate(
                "url => { window.location.href = url; }", wado + "&contentType=application/dicom"
            )
        saved = Path(download.value.path())
        assert saved.read_bytes()[128:132] == b"DICM"
        other = tab.goto(rendered.replace(f"/studies/{study}/", f"/studies/{second}/"))
        assert other is not None and other.status == 404
        time.sleep(max(0.0, made.json()["expires"] + 1 - time.time()))
        expired = tab.goto(rendered)
        assert expired is not None and expired.status == 401
    finally:
        context.close()


def test_an_expired_session_is_refused(browser: Browser, site: Site) -> None:
    """A token that expired (OHIF not renewing it) is refused: 401, and OHIF shows an error."""
    config = app_config(site.proxy, site.idp)
    config["oidc"][0]["automaticSilentRenew"] = False
    site.idp.ttl = EXPIRING
    site.idp.restart()
    session = _open(browser, site, config)
    try:
        search = _log_in(site, session, "alice")
        assert search.status == 200 and _listed(session.page) == sorted(GRANTS["alice"])
        token = search.request.header_value("authorization") or ""
        expiry = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["exp"]
        time.sleep(max(0.0, expiry + 1 - time.time()))
        page = session.page
        with page.expect_response(
            lambda r: r.url.startswith(site.proxy.dicomweb_url + "/studies?")
        ) as again:
            page.get_by_role("textbox").first.fill("HARN")
        refused = again.value
        assert refused.status == 401
        assert refused.request.header_value("authorization") == token
        assert 'error="invalid_token"' in (refused.header_value("www-authenticate") or "")
        # OHIF shows an error and no new answer (it keeps filtering the rows it had, here
        # the one of ACC00005: HARNOIS matches HARN).
        page.get_by_text("Data Source Connection Error").wait_for()
        assert _listed(page) == ["ACC00005"]
        session.screenshot(site, "4-expired-session")
    finally:
        session.context.close()
        site.idp.ttl = TTL
        site.idp.restart()
