"""The floorhand command line (floorhand --help; docs/deployment.md).

floorhand run SITE.toml [--mqtt-url URL] [--api-bind HOST:PORT] [--journal PATH]
floorhand check-config SITE.toml
floorhand token NAME --role floor|supervisor|engineer
floorhand journal backup DEST --site SITE.toml | --journal PATH
floorhand catalog import FILE --site SITE.toml [--dry-run] | export --site SITE.toml
floorhand --version
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import faulthandler
import logging
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller import logs
from controller.build import version
from controller.config import ConfigError, SiteConfig, load_site, split_bind
from controller.sdnotify import Notifier

if TYPE_CHECKING:
    from controller.api.loops import LoopWatch
    from controller.runtime import Runtime

log = logging.getLogger("floorhand")

STOP_BOUND_S = 5.0
"""``floorhand run`` exits at most this long after SIGTERM/SIGINT, whatever the links do."""

HTTP_DRAIN_S = 1
"""How long open HTTP requests may finish on a stop before they are cancelled (whole seconds:
uvicorn's setting is an int)."""

LEFTOVER_TASKS_S = 0.3
"""Bound on the tasks still running once the server returned (cancelled, then abandoned)."""

HTTP_LOOP_STALE_S = 2.0
"""The watchdog is not fed once the HTTP loop has left a callback waiting this long (a wedged
HTTP thread: systemd restarts the controller as for a wedged main loop)."""

THREAD_JOIN_S = 1.0
"""How long the process waits at exit for its other threads (a history write in flight)."""

EXIT_OK = 0
EXIT_FAILED = 1  # the runtime died (fatal MQTT refusal, journal locked, ...)
EXIT_CONFIG = 2
EXIT_REFUSED = 3  # another controller owns the site (journal, API port or broker claim)
EXIT_STOP_OVERRUN = 70  # the stop overran STOP_BOUND_S: every thread's stack is on stderr
EXIT_SIGNAL_BASE = 128  # a second signal: 128 + its number (130 SIGINT, 143 SIGTERM)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
    """The site file, checked, with the packages it needs installed; exit 2 otherwise."""
    from controller.extras import MissingExtraError, check_site

    try:
        site = load_site(args.site, _overrides(args))
        check_site(site)
    except (ConfigError, MissingExtraError) as exc:
        print(f"floorhand: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    return site


def cmd_check_config(args: argparse.Namespace) -> int:
    from controller.adapters.journal import JournalError
    from controller.catalog.start import with_catalogue

    site = _load(args)
    try:  # a site file without the catalogue inline: the journal's (docs/catalogue.md)
        site, catalogue_version = with_catalogue(site)
    except (ConfigError, JournalError) as exc:
        print(f"floorhand: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    per_zone = Counter(s.zone for s in site.shelves)
    formats = Counter(s.format for s in site.scales)
    print(f"site {site.site.id} ({site.site.name or 'unnamed'}): configuration OK")
    print(
        f"  zones   {len(site.zones)}: "
        + ", ".join(f"{z.id} ({per_zone[z.id]} shelves)" for z in site.zones)
    )
    print(
        "  catalog "
        + (
            f"journal version {catalogue_version}"
            if catalogue_version
            else "inline in the site file"
        )
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


class StopGuard:
    """The stop bound of ``floorhand run``.

    The first SIGTERM/SIGINT asks for a graceful stop (``on_stop``: the server shuts down,
    the runtime sends STOP to the PLCs and closes the journal) and starts the bound. A second
    one exits at once with ``128 + signal``. A stop still running ``bound_s`` after the first
    signal writes every thread's stack to stderr (faulthandler) and exits `EXIT_STOP_OVERRUN`.

    Python runs signal handlers in the main thread, between bytecodes: a main thread stuck
    in C code (a blocked SQLite call, a DNS lookup) would never run them. So the signals also
    go through ``signal.set_wakeup_fd`` to a pipe read by this guard's own thread, which keeps
    the bound and the second signal working whatever the main thread is doing; that thread
    calls ``on_stop`` too (it must be safe to call twice, from any thread).
    """

    def __init__(self, bound_s: float = STOP_BOUND_S) -> None:
        self.bound_s = bound_s
        self.stop_requested_at: float | None = None
        """``time.monotonic()`` of the first stop signal (or of `arm`)."""
        self._read_fd = -1
        self._write_fd = -1
        self._deadline: float | None = None
        self._on_stop: Callable[[], None] | None = None
        self._signals = 0
        """Stop signals the guard thread has read (not `arm`: a process leaving on its own,
        then signalled, got a first signal, not a second one)."""

    def install(self, on_stop: Callable[[], None]) -> Callable[[], None]:
        """Take over SIGINT/SIGTERM (main thread only); returns the undo function."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        if self._read_fd < 0:
            self._read_fd, self._write_fd = os.pipe()
            os.set_blocking(self._write_fd, False)
            threading.Thread(target=self._watch, name="stop-guard", daemon=True).start()
        previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._on_stop = on_stop

        def handler(signum: int, frame: object) -> None:
            on_stop()

        original = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}

        def uninstall() -> None:
            for sig, previous in original.items():
                signal.signal(sig, previous)
            signal.set_wakeup_fd(previous_fd)

        return uninstall

    def arm(self) -> None:
        """Start the bound without a signal (the runtime died and the process is leaving)."""
        if self._deadline is None:
            self.stop_requested_at = time.monotonic()
            self._deadline = self.stop_requested_at + self.bound_s
            if self._write_fd >= 0:
                with contextlib.suppress(OSError):
                    os.write(self._write_fd, b"\0")  # wake the guard thread

    def remaining_s(self) -> float | None:
        """Time left before the bound; None if no stop was requested."""
        if self._deadline is None:
            return None
        return self._deadline - time.monotonic()

    def _watch(self) -> None:
        while True:
            left = self.remaining_s()
            if left is not None and left <= 0:
                self._overrun()
            readable, _, _ = select.select([self._read_fd], [], [], left)
            if not readable:
                continue
            for signum in os.read(self._read_fd, 64):
                if signum not in STOP_SIGNALS:
                    continue
                name = signal.Signals(signum).name
                self._signals += 1
                if self._signals == 1:
                    self.arm()
                    # Also from here: the main thread runs the handler only when it next
                    # runs Python code, which a signal delivered to another thread does not
                    # make happen at once (the main thread may sit in its loop's select).
                    if self._on_stop is not None:
                        self._on_stop()
                    log.warning(
                        "%s: stopping (STOP to the PLCs, exit within %g s; "
                        "a second signal exits at once)",
                        name,
                        self.bound_s,
                    )
                else:
                    self._exit_now(signum, name)

    @staticmethod
    def _exit_now(signum: int, name: str) -> None:
        with contextlib.suppress(OSError):
            os.write(2, f"floorhand: second {name}: exiting at once\n".encode())
        os._exit(EXIT_SIGNAL_BASE + signum)

    def _overrun(self) -> None:
        with contextlib.suppress(OSError):
            os.write(
                2,
                f"floorhand: the stop overran its {self.bound_s:g} s bound; the stack of "
                "every thread follows\n".encode(),
            )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(EXIT_STOP_OVERRUN)


def _notify_systemd(notifier: Notifier, runtime: Runtime, server: Any, http: LoopWatch) -> None:
    """After each supervision tick (on the main loop): ``READY=1`` once the journal is open
    and the state restored, the broker session is up and the API serves; the watchdog fed
    while the HTTP loop, which the tick does not run on, still runs (`HTTP_LOOP_STALE_S`)."""
    http.ping()
    if http.alive(HTTP_LOOP_STALE_S):
        notifier.watchdog()
    if notifier.ready_sent or notifier.stopping_sent or not notifier.enabled:
        return
    if runtime.ready and server.started:
        notifier.ready(f"ready: site {runtime.site.site.id}, api http://{runtime.site.api.bind}")
    else:
        notifier.status("waiting for the broker session" if server.started else "starting")


def _server_class(notifier: Notifier | None = None) -> type[Any]:
    import uvicorn

    class Server(uvicorn.Server):
        """Signals go through the `StopGuard`, installed by `_serve` on the main thread (the
        server runs in the ``http`` thread, where uvicorn installs no handlers). Every stop
        signal only asks for a graceful shutdown: uvicorn's own second-SIGINT "force exit"
        would skip the lifespan shutdown, and with it the STOP sent to the PLCs (the guard's
        second signal exits instead)."""

        _stopping = threading.Lock()

        def request_stop(self) -> None:
            """Ask for the graceful stop (from any thread; twice is harmless)."""
            self.should_exit = True
            if notifier is not None:
                with self._stopping:
                    notifier.stopping()

        def handle_exit(self, sig: int, frame: Any) -> None:
            self.request_stop()

    return Server


def _serve(server: Any, sock: socket.socket, app: Any, guard: StopGuard, http: LoopWatch) -> None:
    """The runtime on a new event loop of the main thread (the home loop: the app's lifespan
    runs there; it gives the control loop precedence, `controller.control.new_main_loop`),
    uvicorn on a loop of its own in the ``http`` thread (`serve_apart`, docs/architecture.md
    "Three event loops"); then cancel what is left on the home loop, bounded (asyncio.run
    would wait for each task without limit, and for every default-executor thread)."""
    from controller.api.loops import cancel_leftovers, serve_apart
    from controller.control import new_main_loop

    loop = new_main_loop()
    asyncio.set_event_loop(loop)
    uninstall = guard.install(server.request_stop)
    try:
        loop.run_until_complete(serve_apart(server, [sock], app, watch=http))
    finally:
        uninstall()
        try:
            loop.run_until_complete(cancel_leftovers(LEFTOVER_TASKS_S))
        finally:
            asyncio.set_event_loop(None)
            loop.close()  # the default executor is shut down without waiting


def _leave(exit_code: int, guard: StopGuard) -> int:
    """Return ``exit_code`` once the other threads finished; threads still busy when the stop
    bound nears (a history write blocked in a sink's thread) are abandoned with ``os._exit``.
    Nothing is lost by that: the journal is closed, and outbox rows leave it only after the
    sink confirmed them, so such a batch is sent again after the next start."""
    left = guard.remaining_s()
    budget_s = THREAD_JOIN_S if left is None else max(0.1, min(THREAD_JOIN_S, left - 0.5))
    deadline = time.monotonic() + budget_s
    for thread in threading.enumerate():
        if thread is threading.current_thread() or thread.daemon:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
    busy = [t.name for t in threading.enumerate() if t.is_alive() and not t.daemon]
    busy = [name for name in busy if name != threading.current_thread().name]
    if not busy:
        return exit_code
    log.warning("exiting with %d thread(s) still busy: %s", len(busy), ", ".join(busy))
    logging.shutdown()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(exit_code)


def cmd_run(args: argparse.Namespace) -> int:
    site = _load(args)
    import uvicorn

    from controller.api.app import create_app
    from controller.api.loops import LoopWatch
    from controller.owner import refusal

    host, port = split_bind(site.api.bind)
    # Local resources first, the broker last: a second controller of this site must be
    # refused before it touches the owner's MQTT session (docs/architecture.md).
    try:
        api_socket = _bind_api(host, port)
    except OSError as exc:
        print(f"floorhand: refusing to start: {exc.strerror}", file=sys.stderr)
        return EXIT_REFUSED if exc.errno == errno.EADDRINUSE else EXIT_FAILED
    exit_code = EXIT_OK
    refused: BaseException | None = None
    server: Any = None
    faulthandler.enable()  # a crash in C code still shows where every thread was
    guard = StopGuard()

    def on_runtime_exit(exc: BaseException | None) -> None:
        nonlocal exit_code, refused
        if exc is not None:
            refused = refusal(exc)
            exit_code = EXIT_REFUSED if refused is not None else EXIT_FAILED
        if server is not None:
            server.should_exit = True

    from controller.adapters.journal import JournalError, JournalLocked
    from controller.api.auth import TokenConfigError
    from controller.runtime import Runtime

    notifier = Notifier.from_environ()
    try:
        # With the catalogue (the site file's, or the journal's); the heap alive after the
        # start is frozen out of cyclic collections (Runtime's freeze_heap).
        runtime = Runtime(site, freeze_heap=True)
        runtime.journal.lock()  # before the broker: a second controller must not touch it
    except JournalLocked as exc:
        print(f"floorhand: refusing to start: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except JournalError as exc:
        print(f"floorhand: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ConfigError as exc:  # no catalogue, or one naming a zone the site file lacks
        print(f"floorhand: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    site = runtime.site
    try:
        app = create_app(site, runtime=runtime, on_runtime_exit=on_runtime_exit)
    except TokenConfigError as exc:
        print(f"floorhand: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=args.log_level.lower(),
        log_config=None,  # uvicorn's loggers propagate to ours: one handler, one format
        access_log=False,
        lifespan="on",
        # The live feed serves dashboards on the site network: per-message compression cost
        # about a third of the stream's CPU in benchmarks/ws_fanout.py for little gain.
        ws_per_message_deflate=False,
        # A stop must not wait on a slow request (a history query on a hanging database).
        timeout_graceful_shutdown=HTTP_DRAIN_S,
    )
    server = _server_class(notifier)(config)
    http = LoopWatch("http")
    runtime.supervision.after_tick.append(lambda: _notify_systemd(notifier, runtime, server, http))
    notifier.status("starting: opening the journal, connecting to the broker")
    log.info(
        "floorhand %s: site %s, mqtt %s, api http://%s",
        version(),
        site.site.id,
        site.mqtt.url,
        site.api.bind,
    )
    try:
        with contextlib.suppress(KeyboardInterrupt):
            _serve(server, api_socket, app, guard, http)
    except SystemExit:
        pass  # uvicorn's "startup failed" (3); the runtime's own outcome decides the code
    guard.arm()  # from here on the process leaves within the bound, whatever hangs
    notifier.stopping()
    notifier.close()
    if not server.started and exit_code == EXIT_OK:
        exit_code = EXIT_FAILED
    if refused is not None:
        print(f"floorhand: not started: {refused}", file=sys.stderr)
    return _leave(exit_code, guard)


def _bind_api(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound before anything else starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OSError(
                exc.errno,
                f"the API address {host}:{port} is in use (another controller of this site, "
                "or another program): [api] bind or --api-bind",
            ) from None
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    # Accepted connections inherit it. asyncio turns Nagle off only for sockets created with
    # proto IPPROTO_TCP, which create_server does not do: with Nagle on, every response after
    # the first on a keep-alive connection waited ~40 ms for the client's delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


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


def cmd_journal_backup(args: argparse.Namespace) -> int:
    """``floorhand journal backup DEST``: progress on stderr, a summary line on stdout."""
    from controller.adapters.journal_backup import BackupError, backup_journal

    source: Path = args.journal if args.journal is not None else _load(args).journal.path
    last = [-1]

    def progress(copied: int, total: int) -> None:
        percent = copied * 100 // max(1, total)
        if percent // 10 != last[0] // 10 or copied == total:
            last[0] = percent
            print(f"backup: {copied}/{total} pages ({percent}%)", file=sys.stderr)

    try:
        result = backup_journal(source, args.dest, progress=progress)
    except BackupError as exc:
        print(f"floorhand: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"journal {source} backed up to {result.dest}: {result.pages} pages, "
        f"{result.bytes} bytes, integrity_check ok, {result.took_s:.2f} s"
    )
    return EXIT_OK


TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
"""A token name the site file accepts (``[[api.tokens]] name``)."""


def _token_name(value: str) -> str:
    if not TOKEN_NAME.match(value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return value


def _from_env(
    parser: argparse.ArgumentParser, var: str, allowed: tuple[str, ...], default: str
) -> str:
    """The default of an option from the environment, checked like the option itself."""
    value = os.environ.get(var, default)
    checked = value.lower() if allowed == logs.FORMATS else value.upper()
    if checked not in allowed:
        parser.error(f"{var}={value!r}: choose from {', '.join(allowed)}")
    return checked


def _add_log_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=logs.LEVELS,
        default=default,
        help="log lines at this level and above (default INFO; env FLOORHAND_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-format",
        type=str.lower,
        choices=logs.FORMATS,
        default=default,
        help="text: 'LEVEL logger: message', time-stamped unless stderr is the systemd journal; "
        "json: one object per line (default text; env FLOORHAND_LOG_FORMAT)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (every bad flag is a usage error, exit 2)."""
    parser = argparse.ArgumentParser(
        prog="floorhand",
        description="Floorhand, the warehouse controller: MQTT shelf scales, Modbus conveyors "
        "and sorters, reorder alerts, history, the API and the dashboard.",
    )
    parser.add_argument("--version", action="version", version=f"floorhand {version()}")
    _add_log_flags(parser, default=None)
    log_flags = argparse.ArgumentParser(add_help=False)
    _add_log_flags(log_flags, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_run = sub.add_parser("run", help="run the controller for a site", parents=[log_flags])
    p_run.add_argument("site", type=Path, help="the site file (TOML)")
    p_run.add_argument("--mqtt-url", help="override [mqtt] url (env FLOORHAND_MQTT_URL)")
    p_run.add_argument("--api-bind", help="override [api] bind HOST:PORT (env FLOORHAND_API_BIND)")
    p_run.add_argument("--journal", help="override [journal] path (env FLOORHAND_JOURNAL)")
    p_run.set_defaults(fn=cmd_run)
    p_chk = sub.add_parser(
        "check-config", help="validate a site file and print a summary", parents=[log_flags]
    )
    p_chk.add_argument("site", type=Path, help="the site file (TOML)")
    p_chk.set_defaults(fn=cmd_check_config)
    p_tok = sub.add_parser(
        "token", help="make an API token and print its [[api.tokens]] entry", parents=[log_flags]
    )
    p_tok.add_argument(
        "name", type=_token_name, help="who holds it (letters, digits, _ . -; at most 64)"
    )
    p_tok.add_argument("--role", required=True, choices=["floor", "supervisor", "engineer"])
    p_tok.set_defaults(fn=cmd_token)
    p_jrn = sub.add_parser("journal", help="journal maintenance (backup)", parents=[log_flags])
    jrn = p_jrn.add_subparsers(dest="journal_command", required=True, metavar="ACTION")
    p_bak = jrn.add_parser(
        "backup",
        help="copy the journal to DEST (SQLite online backup: safe while the controller runs)",
        parents=[log_flags],
    )
    p_bak.add_argument("dest", type=Path, help="the new file to write (never overwritten)")
    where = p_bak.add_mutually_exclusive_group(required=True)
    where.add_argument("--site", type=Path, help="the site file: its [journal] path")
    where.add_argument("--journal", type=Path, help="the journal file itself")
    p_bak.set_defaults(fn=cmd_journal_backup)
    from controller.site_schema import cmd_config_schema

    p_cfg = sub.add_parser("config", help="site file tools (schema)", parents=[log_flags])
    cfg = p_cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p_sch = cfg.add_parser(
        "schema",
        help="print the site file's JSON Schema (docs/site-file.md), for editors",
        parents=[log_flags],
    )
    p_sch.set_defaults(fn=cmd_config_schema)
    from controller.catalog.cli import add_parser as add_catalog_parser

    add_catalog_parser(sub, [log_flags])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level is None:
        args.log_level = _from_env(parser, "FLOORHAND_LOG_LEVEL", logs.LEVELS, "INFO")
    if args.log_format is None:
        args.log_format = _from_env(parser, "FLOORHAND_LOG_FORMAT", logs.FORMATS, "text")
    logs.configure(args.log_level, args.log_format)
    try:
        rc: int = args.fn(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`floorhand check-config SITE | head -1`): no traceback, and no
        # second one at exit when Python flushes stdout again (the recipe of Python's docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
