"""Embedding the proxy in a Starlette (or FastAPI) application under ``/pacs``.

Run it with ``PROXY_CONFIG=examples/orthanc.toml hypercorn examples.mount_in_starlette:app``;
DICOMweb is then at ``http://127.0.0.1:8000/pacs/dicomweb``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from shanoir_dicomweb_proxy import Settings, create_app


def build_app(settings: Settings) -> Starlette:
    proxy = create_app(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Starlette runs no lifespan for mounted apps: open the proxy's upstream client here.
        async with proxy:
            yield

    async def home(request: Request) -> JSONResponse:
        return JSONResponse(
            {"dicomweb": str(request.url_for("pacs", path=settings.server.base_path))}
        )

    return Starlette(
        routes=[Route("/", home), Mount("/pacs", app=proxy, name="pacs")],
        lifespan=lifespan,
    )


app = build_app(Settings.from_toml(os.environ.get("PROXY_CONFIG", "examples/orthanc.toml")))
