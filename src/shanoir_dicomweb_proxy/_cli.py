"""The ``shanoir-dicomweb-proxy`` command line."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._access import ACTIONS, Action
from ._app import DicomWebProxy, create_app
from ._auth import dev_token
from ._config import Settings
from ._engines import run_server
from ._errors import ConfigError, ProxyError
from ._identifiers import UidFormatter
from ._observability import configure_logging
from ._probes import ProbeResult, listen_failure, probe_listen
from ._store import SqliteStore, StoreError, SyncProgress, load_import, sync_store
from ._upstream import Upstream
from ._version import __version__

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shanoir-dicomweb-proxy",
        description="An authorizing, identifier-translating, streaming DICOMweb gateway.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run the proxy under hypercorn (or uvicorn: [server] engine)"
    )
    serve.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML settings")
    serve.add_argument("--bind", metavar="HOST:PORT", help="override [server] bind")
    serve.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes")

    check = commands.add_parser("check", help="validate the settings and probe the upstream")
    check.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML settings")

    token = commands.add_parser(
        "dev-token", help="sign a token with the private key of [auth] jwks_file (demos, tests)"
    )
    token.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML settings")
    token.add_argument("--sub", required=True, metavar="USER", help="the token's subject")
    token.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="K=V",
        help="an extra claim; V is read as JSON when it parses, dotted K nests (repeatable)",
    )
    token.add_argument("--ttl", type=int, default=3600, metavar="S", help="lifetime in seconds")

    store = commands.add_parser("store", help="manage the embedded store ([store] path)")
    store_commands = store.add_subparsers(dest="store_command", required=True, metavar="COMMAND")
    sync = store_commands.add_parser(
        "sync", help="register every upstream study and series (idempotent, resumable)"
    )
    sync.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML settings")
    sync.add_argument(
        "--page-size", type=int, default=500, metavar="N", help="QIDO limit per request (500)"
    )
    listing = store_commands.add_parser(
        "list", help="examinations with their UIDs and acquisitions"
    )
    listing.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML settings")
    listing.add_argument("--json", action="store_true", help="write one JSON array")
    load = store_commands.add_parser(
        "import", help="bind explicit IDs to UIDs from a JSON or CSV export (all or nothing)"
    )
    load.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML settings")
    load.add_argument("path", metavar="PATH", help="a JSON array or a CSV file (docs/store.md)")
    for name, text in (
        ("grant", "let a user read, download or write an examination (docs/access.md)"),
        ("revoke", "remove a grant that store grant gave"),
    ):
        rights = store_commands.add_parser(name, help=text)
        rights.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML settings")
        rights.add_argument(
            "--user",
            required=True,
            metavar="USER",
            help="the user ID ([auth] user_claim), else subject",
        )
        rights.add_argument(
            "--study", required=True, type=_exam_id, metavar="EXAM_ID", help="the examination ID"
        )
        rights.add_argument("--action", required=True, choices=ACTIONS, help="what the user may do")
    return parser


def _exam_id(text: str) -> int:
    """An examination ID on the command line: a positive integer."""
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 2**63:
        raise argparse.ArgumentTypeError(
            f"expected an examination ID (a positive integer), got {text!r}"
        )
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(args.config)
    try:
        settings = Settings.from_toml(args.config)
        if args.command == "serve":
            return _serve(settings, args.config, bind=args.bind, workers=args.workers)
        if args.command == "dev-token":
            print(dev_token(settings, args.sub, _claims(args.claim), ttl=args.ttl))
            return 0
        if args.command == "store":
            return _store(settings, args)
        raise AssertionError(f"unknown command {args.command!r}")
    except (ConfigError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _claims(items: list[str]) -> dict[str, Any]:
    claims: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--claim {item!r}: expected KEY=VALUE")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        target = claims
        *parents, last = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    return claims


def _setup_logging(settings: Settings) -> None:
    configure_logging(settings)


def _serve(settings: Settings, path: str, *, bind: str | None, workers: int) -> int:
    if workers < 1:
        raise ConfigError("--workers: expected a positive integer")
    if bind is not None:
        settings = _bound(settings, bind)
    server = settings.server
    # A taken port is one line and status 2, found before anything starts.
    listen = probe_listen(server.host, server.port)
    if not listen.ok:
        return _cannot_listen(server.bind, listen.detail)
    _setup_logging(settings)
    app = create_app(settings)  # validates before anything listens
    try:
        return run_server(app, settings, path, workers)
    except OSError as exc:
        if exc.filename is not None or exc.errno not in _BIND_ERRORS:
            raise
        # Taken between the probe and the server's own bind.
        return _cannot_listen(server.bind, listen_failure(exc, server.host))


_BIND_ERRORS = frozenset({errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL})


def _bound(settings: Settings, bind: str) -> Settings:
    """``settings`` listening on ``serve --bind``, checked as ``[server] bind`` is."""
    try:
        server = dataclasses.replace(settings.server, bind=bind)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("[server] bind", "--bind", 1)) from None
    return dataclasses.replace(settings, server=server)


def _cannot_listen(bind: str, why: str) -> int:
    print(f"error: cannot listen on {bind}: {why}", file=sys.stderr)
    return 2


def _check(path: str) -> int:
    """``check``: the file, then the probes ``/readyz`` runs (the issuer's keys fetched now).

    One line per check on stdout, then a summary; exit status 1 when any check fails. A
    problem is reported, never raised: no traceback.
    """
    try:
        failed = _check_all(path)
    except KeyboardInterrupt:
        print("check: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        _check_line(False, "check", f"stopped by an unexpected error: {type(exc).__name__}: {exc}")
        failed = 1
    if failed:
        print(f"{failed} check{'s' if failed > 1 else ''} failed")
        return 1
    print("all checks passed")
    return 0


def _check_all(path: str) -> int:
    """Print each check's line; return how many failed."""
    try:
        settings = Settings.from_toml(path)
    except ConfigError as exc:
        _check_line(False, "settings", str(exc))
        return 1
    missing = _missing_store(settings)
    with tempfile.TemporaryDirectory() as scratch:
        # A missing store is reported, not created: the app is built on a scratch one.
        built = settings if missing is None else _store_in(settings, scratch)
        try:
            app = create_app(built)
        except (ConfigError, StoreError) as exc:
            _check_line(False, "settings", str(exc))
            return 1
        _check_line(True, "settings", f"{settings.source}: valid")
        results = asyncio.run(_probe(app))
    results.append(probe_listen(settings.server.host, settings.server.port))
    if missing is not None:
        results = [r for r in results if r.name != "store"] + [missing]
    for result in results:
        _check_line(result.ok, result.name, _check_text(settings, result))
    return sum(not result.ok for result in results)


async def _probe(app: DicomWebProxy) -> list[ProbeResult]:
    """The app's readiness probes, once and afresh; the app is closed after."""
    try:
        return await app.probes.run(fresh=True)
    finally:
        await app.__aexit__(None, None, None)


def _missing_store(settings: Settings) -> ProbeResult | None:
    """The failed store check when the settings use an embedded store that does not exist."""
    uses_store = "sqlite" in (settings.mapping.backend, settings.access.backend)
    if not uses_store or Path(settings.store.path).exists():
        return None
    hint = "`store sync` creates it from the upstream (or `store import` from a file)"
    return ProbeResult("store", False, f"no store there: {hint}")


def _store_in(settings: Settings, directory: str) -> Settings:
    store = dataclasses.replace(settings.store, path=os.path.join(directory, "check.sqlite3"))
    return dataclasses.replace(settings, store=store)


def _check_text(settings: Settings, result: ProbeResult) -> str:
    """What a check's line says: what was checked, the result, what to fix when it is clear."""
    auth = settings.auth
    took = f" ({result.duration * 1000:.0f} ms)"
    hint = ""
    if result.name == "upstream":
        if not result.ok and ("unreachable" in result.detail or "no answer" in result.detail):
            hint = ": check [upstream] url, and that the PACS runs"
        return f"{settings.upstream.url}: {result.detail}{took}{hint}"
    if result.name == "issuer":
        if auth.jwks_file:
            where = auth.jwks_file
        elif auth.issuer or auth.jwks_url:
            where = auth.issuer or auth.jwks_url
            if not result.ok:
                hint = f": check [auth] {'issuer' if auth.issuer else 'jwks_url'}"
        else:
            where = auth.introspection.url if auth.introspection else ""
        return f"{where}: {result.detail}{took}{hint}"
    if result.name in ("mapping", "access"):
        section = settings.mapping if result.name == "mapping" else settings.access
        if section.backend == "http":
            return f"{section.url}: {result.detail}{took}"
    if result.name == "listen":
        hint = "" if result.ok else ": choose another [server] bind"
        return f"{settings.server.bind}: {result.detail}{hint}"
    if result.name == "store" and "sqlite" in (settings.mapping.backend, settings.access.backend):
        return f"{settings.store.path}: {result.detail}"
    return result.detail


def _check_line(ok: bool, name: str, text: str) -> None:
    print(f"{'ok' if ok else 'FAIL':<4}  {name:<8}  {text}", flush=True)


# --- store ------------------------------------------------------------------------------------
# The store commands never build the app: they work whatever [mapping] backend says.


def _store(settings: Settings, args: argparse.Namespace) -> int:
    path = settings.store.path
    if args.store_command == "sync":
        if args.page_size < 1:
            raise ConfigError("--page-size: expected a positive integer")
        with SqliteStore(path) as store:
            return _store_sync(settings, store, page_size=args.page_size)
    if args.store_command == "list":
        with SqliteStore(path, create=False) as store:
            return _store_list(settings, store, as_json=args.json)
    if args.store_command in ("grant", "revoke"):
        with SqliteStore(path, create=False) as store:
            return _store_rights(store, args.store_command, args.user, args.study, args.action)
    data = load_import(args.path)  # read it all before the store is touched
    with SqliteStore(path) as store:
        try:
            summary = store.import_entries(data.rows, data.grants)
        except StoreError as exc:
            raise StoreError(f"{args.path}: {exc}; nothing was imported") from None
    grants = f", {summary.new_grants} new grants" if data.grants else ""
    print(
        f"{summary.rows} rows: {summary.new_studies} new examinations, "
        f"{summary.new_series} new acquisitions{grants}"
    )
    return 0


def _store_rights(store: SqliteStore, command: str, user: str, exam_id: int, action: Action) -> int:
    """``store grant`` and ``store revoke``: one line on stdout says what changed."""
    if command == "grant":
        if store.grant(user, exam_id, action):
            print(f"granted: user {user} may {action} examination {exam_id}")
        else:
            print(f"unchanged: user {user} may already {action} examination {exam_id}")
        return 0
    if store.revoke(user, exam_id, action):
        print(f"revoked: user {user} may no longer {action} examination {exam_id}", end="")
    else:
        print(f"unchanged: user {user} has no {action} grant on examination {exam_id}", end="")
    if exam_id in store.visible_exams(user, action):
        print(" (but a download grant still lets them read it)")
    else:
        print()
    return 0


class _SyncDisplay:
    """The progress line of ``store sync``: on stderr, in place, only on a terminal."""

    def __init__(self) -> None:
        self.live = sys.stderr.isatty()
        self.shown = False
        self._last = 0.0

    def __call__(self, state: SyncProgress) -> None:
        now = time.monotonic()
        if not self.live or (state.phase != "done" and now - self._last < 0.1):
            return
        self._last = now
        if state.phase == "listing":
            text = f"listing studies: {state.listed}"
        else:
            text = (
                f"{state.studies}/{state.total} studies, "
                f"{state.series} series ({state.new_series} new)"
            )
        sys.stderr.write(f"\r\x1b[Kstore sync: {text}")
        sys.stderr.flush()
        self.shown = True

    def end(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.shown = False


def _store_sync(settings: Settings, store: SqliteStore, *, page_size: int) -> int:
    """Walk the upstream and register what is new; the summary goes to stdout."""
    state = SyncProgress()
    display = _SyncDisplay()

    async def run() -> None:
        upstream = Upstream(settings.upstream)
        try:
            await sync_store(store, upstream, page_size=page_size, progress=state, report=display)
        finally:
            await upstream.aclose()

    try:
        asyncio.run(run())
    except (ProxyError, KeyboardInterrupt) as exc:
        display.end()
        reason = exc.detail if isinstance(exc, ProxyError) else "interrupted"
        print(f"error: store sync: {reason}", file=sys.stderr)
        print(f"stopped after {state.summary()}: store sync again to carry on", file=sys.stderr)
        return 1 if isinstance(exc, ProxyError) else 130
    display.end()
    for conflict in state.conflicts:
        print(f"warning: {conflict}: left out", file=sys.stderr)
    print(state.summary())
    return 1 if state.conflicts else 0


def _store_list(settings: Settings, store: SqliteStore, *, as_json: bool) -> int:
    """Examinations by ID, each with its real study UID and acquisitions.

    ``--json`` writes one array (which ``store import`` reads back)::

        [{"exam_id": 1, "study_uid": "1.2.…", "public_study_uid": "1.4.9.….1",
          "acquisitions": [{"acquisition_id": 1, "series_uid": "1.2.…",
                            "public_series_uid": "1.4.9.….1"}]}]

    Each examination also lists its ``grants``: ``[{"user": "7", "action": "read"}]``.
    Public UIDs are formatted with ``[mapping] study_root``/``series_root`` when
    ``[mapping] backend = "sqlite"`` (the one backend that serves these IDs); null otherwise.
    """
    mapping = settings.mapping
    formatter = UidFormatter(mapping.study_root, mapping.series_root)
    public = mapping.backend == "sqlite"
    entries = store.entries()
    if as_json:
        data = [
            {
                "exam_id": entry.exam_id,
                "study_uid": entry.study_uid,
                "public_study_uid": formatter.study_uid(entry.exam_id) if public else None,
                "acquisitions": [
                    {
                        "acquisition_id": series.acquisition_id,
                        "series_uid": series.series_uid,
                        "public_series_uid": (
                            formatter.series_uid(series.acquisition_id) if public else None
                        ),
                    }
                    for series in entry.acquisitions
                ],
                "grants": [{"user": g.user, "action": g.action} for g in entry.grants],
            }
            for entry in entries
        ]
        print(json.dumps(data, indent=2))
        return 0
    acquisitions = grants = 0
    for entry in entries:
        shown = f"  public {formatter.study_uid(entry.exam_id)}" if public else ""
        print(f"examination {entry.exam_id}  study {entry.study_uid}{shown}")
        for series in entry.acquisitions:
            shown = f"  public {formatter.series_uid(series.acquisition_id)}" if public else ""
            print(f"  acquisition {series.acquisition_id}  series {series.series_uid}{shown}")
        for grant in entry.grants:
            print(f"  grant {grant.action}  user {grant.user}")
        acquisitions += len(entry.acquisitions)
        grants += len(entry.grants)
    shown = f", {grants} grants" if grants else ""
    print(f"{len(entries)} examinations, {acquisitions} acquisitions{shown}")
    return 0
