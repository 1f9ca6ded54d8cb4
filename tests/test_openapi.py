"""``docs/openapi.yaml`` is a valid OpenAPI document, and it cannot drift from the router: every
path it documents is a route that takes exactly the methods it lists (besides HEAD and
OPTIONS), and every path the router accepts is documented."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_spec_validator import validate

from shanoir_dicomweb_proxy import Level, NotFound, ProxyError, Resource, ServerSettings
from shanoir_dicomweb_proxy._routing import parse_route

OPENAPI = Path(__file__).parents[1] / "docs" / "openapi.yaml"
BASE = ServerSettings().base_path
#: A value for each path parameter of the document.
VALUES = {
    "study": "1.2",
    "series": "1.2.3",
    "instance": "1.2.3.4",
    "frames": "1,2",
    "tag": "7fe00010",
}
#: Served outside the router: the signed-link issuer (LinkIssuer) and the probes and metrics.
NOT_ROUTED = {f"{BASE}/links", "/healthz", "/readyz", "/metrics"}
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(OPENAPI.read_text())
    return loaded


#: The query WADO-URI needs (its UIDs are in the query, not the path).
WADO = b"requestType=WADO&studyUID=1.2&seriesUID=1.2.3&objectUID=1.2.3.4"


def _scope(path: str, method: str = "GET") -> dict[str, Any]:
    query = WADO if path.endswith("/wado") else b""
    return {"type": "http", "path": path, "method": method, "query_string": query}


def _methods(item: dict[str, Any]) -> set[str]:
    return {method.upper() for method in _METHODS if method in item}


def test_the_document_is_valid_openapi(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"].startswith("3.1")


def test_the_operational_paths_are_the_default_settings(document: dict[str, Any]) -> None:
    server = ServerSettings()
    outside = {path for path in document["paths"] if not path.startswith(BASE + "/")}
    assert outside == {server.healthz_path, server.readyz_path, server.metrics_path}
    for path in outside:
        assert document["paths"][path]["get"]["security"] == []  # no token


def test_every_documented_route_is_served_with_the_methods_documented(
    document: dict[str, Any],
) -> None:
    for template, item in document["paths"].items():
        if template in NOT_ROUTED:
            continue
        path = template.format(**VALUES)
        documented = _methods(item)
        for method in documented:
            request, allowed, _ = parse_route(_scope(path, method), base_path=BASE)
            assert request.method == method
        # The router's other methods are HEAD and OPTIONS, which the document describes in prose.
        assert set(allowed) - {"HEAD", "OPTIONS"} == documented, template


def _words() -> list[str]:
    """Every path word the router could use, and some it must not: levels, resources, the
    bulk data words, WADO-URI, and other services' words."""
    words = {level.segment for level in Level} | {resource.value for resource in Resource}
    words |= {"bulk", "wado", "links", "patients", "workitems"}
    return sorted(words) + ["1", "1,2", "7fe00010"]  # a UID, item or frame; frames; a tag


def _candidates(document: dict[str, Any]) -> Iterator[list[str]]:
    """Every path of up to four segments, and every path that extends one of the documented
    paths, or a prefix of one, by up to three segments."""
    words = _words()
    for length in range(1, 5):
        yield from (list(p) for p in itertools.product(words, repeat=length))
    prefixes = {
        tuple(template.format(**VALUES)[len(BASE) + 1 :].split("/")[:end])
        for template in document["paths"]
        if template.startswith(BASE + "/")
        for end in range(1, 9)
    }
    for prefix in prefixes:
        for length in range(1, 4):
            yield from ([*prefix, *p] for p in itertools.product(words, repeat=length))


def _pattern(template: str) -> re.Pattern[str]:
    pattern = re.sub(r"\\\{[a-z]+\\\}", "[^/]+", re.escape(template))
    if template.endswith("/{tag}"):
        pattern += "(?:/[^/]+)*"  # a bulk data path goes on into sequences (documented)
    return re.compile(pattern)


def test_every_route_the_router_takes_is_documented(document: dict[str, Any]) -> None:
    patterns = [_pattern(template) for template in document["paths"]]
    documented = {
        parse_route(_scope(template.format(**VALUES)), base_path=BASE).request.route
        for template in document["paths"]
        if template.startswith(BASE + "/") and template not in NOT_ROUTED
    }
    kinds: set[str] = set()
    for segments in _candidates(document):
        path = f"{BASE}/{'/'.join(segments)}"
        try:
            kinds.add(parse_route(_scope(path), base_path=BASE).request.route)
        except NotFound:
            continue
        except ProxyError:  # another refusal (a frame list of 400): still a route
            pass
        assert any(p.fullmatch(path) for p in patterns), f"{path} is not in docs/openapi.yaml"
    assert kinds == documented  # kinds such as wado.frames.instance or qido.search.series
