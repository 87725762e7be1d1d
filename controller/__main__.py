"""The ``floorhand`` command line.

floorhand run SITE.toml [--mqtt-url URL] [--api-bind HOST:PORT] [--journal PATH]
floorhand check-config SITE.toml
floorhand token NAME --role floor|supervisor|engineer
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from controller.config import ConfigError, SiteConfig, load_site, split_bind


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    out: dict[str, str] = {}
    if getattr(args, "mqtt_url", None):
        out["mqtt_url"] = args.mqtt_url
    if getattr(args, "api_bind", None):
        out["api_bind"] = args.api_bind
    if getattr(args, "journal", None):
        out["journal_path"] = args.journal
    return out


def _load(args: argparse.Namespace) -> SiteConfig:
    try:
        return load_site(args.site, _overrides(args))
    except ConfigError as exc:
        print(f"floorhand: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    site = _load(args)
    per_zone = Counter(s.zone for s in site.shelves)
    formats = Counter(s.format for s in site.scales)
    print(f"site {site.site.id} ({site.site.name or 'unnamed'}): configuration OK")
    print(
        f"  zones   {len(site.zones)}: "
        + ", ".join(f"{z.id} ({per_zone[z.id]} shelves)" for z in site.zones)
    )
    print(f"  SKUs    {len(site.skus)}")
    print(f"  shelves {len(site.shelves)}")
    print(
        f"  scales  {len(site.scales)}: "
        + ", ".join(f"{n} {f}" for f, n in sorted(formats.items()))
    )
    version = "5" if site.mqtt.protocol == 5 else "3.1.1"
    print(
        f"  mqtt    {site.mqtt.url} (MQTT {version}, client id {site.mqtt.client_id}, "
        f"prefix {site.mqtt.topic_prefix})"
    )
    print(f"  journal {site.journal.path}")
    print(f"  api     http://{site.api.bind}")
    from controller.api.auth import TokenConfigError, TokenStore

    try:
        store = TokenStore.from_config(site.api, os.environ)
    except TokenConfigError as exc:
        print(f"floorhand: {exc}", file=sys.stderr)
        return 2
    if store.open_mode:
        print('  auth    OFF ([api] auth = "off"): every route is open')
    else:
        roles = Counter(e.role.value for e in store.entries)
        print(
            f"  auth    {len(store.entries)} token(s)"
            + "".join(f", {n} {r}" for r, n in sorted(roles.items()))
        )
    return 0


def _server_class() -> type[Any]:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after a graceful shutdown, so the process would
        die by the signal; a controller that stopped cleanly exits 0 instead."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server


def cmd_run(args: argparse.Namespace) -> int:
    site = _load(args)
    import uvicorn

    from controller.api.app import create_app

    host, port = split_bind(site.api.bind)
    exit_code = 0
    server: Any = None

    def on_runtime_exit(exc: BaseException | None) -> None:
        nonlocal exit_code
        if exc is not None:
            exit_code = 1
        if server is not None:
            server.should_exit = True

    from controller.api.auth import TokenConfigError

    try:
        app = create_app(site, on_runtime_exit=on_runtime_exit)
    except TokenConfigError as exc:
        print(f"floorhand: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=args.log_level.lower(),
        access_log=False,
        lifespan="on",
        # The live feed serves dashboards on the site network: per-message compression cost
        # about a third of the stream's CPU in benchmarks/ws_fanout.py for little gain.
        ws_per_message_deflate=False,
    )
    server = _server_class()(config)
    logging.getLogger("floorhand").info(
        "floorhand %s: site %s, mqtt %s, api http://%s",
        "0.1.0",
        site.site.id,
        site.mqtt.url,
        site.api.bind,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(server.serve())
    if not server.started and exit_code == 0:
        exit_code = 1
    return exit_code


def cmd_token(args: argparse.Namespace) -> int:
    """Print a new API token and the site-file entry holding its hash (docs/api.md)."""
    from controller.api.auth import hash_token, new_token

    token = new_token()
    print(f"# token for {args.name} ({args.role}); give it to the client, it is not stored:")
    print(token)
    print("# site file entry (only the hash is kept):")
    print("[[api.tokens]]")
    print(f'name = "{args.name}"')
    print(f'role = "{args.role}"')
    print(f'sha256 = "{hash_token(token)}"')
    print("# or, without touching the file, in the controller's environment:")
    print(
        f"# FLOORHAND_TOKEN_{args.name.upper().replace('-', '_').replace('.', '_')}="
        f"{args.role}:{token}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="floorhand", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--log-level", default=os.environ.get("FLOORHAND_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the controller for a site")
    p_run.add_argument("site", type=Path)
    p_run.add_argument("--mqtt-url", help="override [mqtt] url (env FLOORHAND_MQTT_URL)")
    p_run.add_argument("--api-bind", help="override [api] bind HOST:PORT (env FLOORHAND_API_BIND)")
    p_run.add_argument("--journal", help="override [journal] path (env FLOORHAND_JOURNAL)")
    p_run.set_defaults(fn=cmd_run)
    p_chk = sub.add_parser("check-config", help="validate a site file and print a summary")
    p_chk.add_argument("site", type=Path)
    p_chk.set_defaults(fn=cmd_check_config)
    p_tok = sub.add_parser("token", help="make an API token and print its [[api.tokens]] entry")
    p_tok.add_argument("name", help="who holds it (letters, digits, _ . -)")
    p_tok.add_argument("--role", required=True, choices=["floor", "supervisor", "engineer"])
    p_tok.set_defaults(fn=cmd_token)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    rc: int = args.fn(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
