"""The container files (``Dockerfile``, ``deploy/compose.yaml``), checked without a container.

No container can be run on the test machine (docs/deployment.md, "Container": podman installs
from Debian but ``crun`` is refused ``setrlimit`` by the machine's own sandbox, and base
images would have to come from a container registry). What is checked instead:

* the image's command run as a process here: the Dockerfile's ENTRYPOINT + CMD, its ENV, the
  compose file's ``environment`` and ``secrets`` for the controller (as the test's user, not
  the image's USER: this virtualenv's interpreter lives under /root, which uid 10001 cannot
  reach), with the container paths mapped onto the
  checkout (``/opt/floorhand`` is this virtualenv, ``COPY`` destinations are their sources)
  and onto temporary folders (the journal volume, the site file, ``/run/secrets``), against
  mosquitto with the SHIPPED config. It must become ready, put its journal on the volume, pass
  the Dockerfile's HEALTHCHECK command, and stop on SIGTERM inside the compose grace period;
* every file the compose file mounts from the repository exists and is what the mosquitto
  config, the Grafana provisioning and the image expect.

Everything is parsed from the two files, so the test and the files cannot drift apart.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.controller_proc import ROOT, api_port
from tests.integration.test_mosquitto_config import (
    MOSQUITTO,
    MOSQUITTO_PASSWD,
    USERS,
    active_lines,
    start_broker,
)
from tests.sites import write_small_site
from tests.waiting import wait_for_condition

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "deploy" / "compose.yaml"
COMPOSE_DIR = COMPOSE.parent
MOSQUITTO_CONF = ROOT / "firmware-configs" / "mosquitto" / "mosquitto.conf"
GRAFANA = ROOT / "dashboards" / "grafana"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"
READY_TIMEOUT_S = 30.0


# ----------------------------------------------------------------------------- Dockerfile
@dataclass
class Dockerfile:
    """What the final stage of the Dockerfile sets."""

    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    copies: dict[str, str] = field(default_factory=dict)
    """Destination in the image -> source in the build context (COPY without --from)."""
    all_copy_sources: list[str] = field(default_factory=list)
    user: str = ""
    workdir: str = ""
    expose: list[str] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        word, _, args = (buf + line).partition(" ")
        out.append((word.upper(), args.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continuation line"
    return out


def parse_dockerfile(text: str) -> Dockerfile:
    steps = instructions(text)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    df = Dockerfile()
    for i, (word, args) in enumerate(steps):
        if word == "COPY":
            df.all_copy_sources += [
                a for a in shlex.split(args)[:-1] if not a.startswith("--") and "--from" not in args
            ]
        if i < last_from:
            continue
        if word == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {item}: use the KEY=VALUE form"
                assert "$" not in value, f"ENV {key}: the test does not expand variables"
                df.env[key] = value
        elif word in ("ENTRYPOINT", "CMD"):
            setattr(df, word.lower(), json.loads(args))  # exec form only
        elif word == "HEALTHCHECK":
            _, sep, command = args.partition(" CMD ")
            assert sep, "HEALTHCHECK needs a CMD"
            df.healthcheck = json.loads(command)
        elif word == "VOLUME":
            df.volumes += json.loads(args) if args.startswith("[") else args.split()
        elif word == "COPY" and "--from" not in args:
            *sources, dest = shlex.split(args)
            assert len(sources) == 1, "one source per COPY in the final stage"
            df.copies[dest] = sources[0]
        elif word == "USER":
            df.user = args
        elif word == "WORKDIR":
            df.workdir = args
        elif word == "EXPOSE":
            df.expose += args.split()
    return df


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax volume; a named volume's source has no slash."""
    out = []
    for spec in service.get("volumes", []):
        source, target, *_ = str(spec).split(":")
        out.append((source, target))
    return out


def compose_path(source: str) -> Path:
    return (COMPOSE_DIR / source).resolve()


def covered(path: str, targets: list[str]) -> bool:
    return any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets)


class PathMap:
    """Container paths -> host paths, longest prefix first."""

    def __init__(self, mapping: dict[str, Path]) -> None:
        self.mapping = sorted(mapping.items(), key=lambda kv: -len(kv[0]))

    def __call__(self, value: str) -> str:
        for prefix, host in self.mapping:
            if value == prefix or value.startswith(prefix.rstrip("/") + "/"):
                return str(host) + value[len(prefix.rstrip("/")) :]
        return value


# ----------------------------------------------------------------------------- the image's command
def missing(paths: list[str]) -> list[str]:
    return [p for p in paths if not Path(p).exists()]


@pytest.fixture
def folder() -> Iterator[Path]:
    # Not pytest's tmp_path: its parent is 0700 root, which the broker's dropped user cannot
    # traverse.
    root = Path(tempfile.mkdtemp(prefix="fh-container-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def run_healthcheck(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return await proc.wait(), out.decode()


@pytest.mark.skipif(
    not Path(MOSQUITTO).exists() or MOSQUITTO_PASSWD is None,
    reason="mosquitto / mosquitto_passwd not installed",
)
async def test_the_image_command_gets_ready_on_the_shipped_mosquitto_and_passes_its_healthcheck(
    folder: Path,
) -> None:
    image = parse_dockerfile(DOCKERFILE.read_text())
    compose = load_compose()
    service = compose["services"]["floorhand"]
    assert image.entrypoint
    assert image.cmd
    assert image.healthcheck
    assert image.user.split(":")[0] not in ("", "0", "root"), image.user
    [volume] = image.volumes
    assert image.env["STATE_DIRECTORY"] == volume, "the journal must land on the volume"

    (folder / "broker").mkdir()
    broker = start_broker(folder / "broker")  # the shipped config, port and paths rewritten
    try:
        # The container's file system, as the compose file and the Dockerfile lay it out.
        host: dict[str, Path] = {"/opt/floorhand": Path(sys.prefix)}  # the wheel's virtualenv
        host.update({dest: ROOT / src for dest, src in image.copies.items()})
        mounts = dict((t, s) for s, t in bind_mounts(service))
        site_target = next(t for t, s in mounts.items() if s.endswith("site.toml"))
        etc = folder / "etc"
        etc.mkdir(mode=0o755)
        site = write_small_site(etc, mqtt_port=broker.port)
        # The journal goes to $STATE_DIRECTORY (no [journal] path); the shipped ACL allows the
        # controller only the "floorhand" topic prefix.
        text = re.sub(r"\[journal\]\npath = .*\n", "", site.read_text())
        site.write_text(text.replace('topic_prefix = "fh"', 'topic_prefix = "floorhand"'))
        host[site_target] = site
        state = folder / "volume"
        state.mkdir(mode=0o750)
        host[volume] = state
        secrets = folder / "secrets"
        secrets.mkdir(mode=0o755)
        for name in service["secrets"]:
            assert name == "mqtt-password", f"the test knows no secret {name!r}"
            (secrets / name).write_text(USERS["floorhand-controller"] + "\n")
        host["/run/secrets"] = secrets
        to_host = PathMap(host)

        port = api_port()
        bind = image.env["FLOORHAND_API_BIND"]
        assert bind.endswith(":" + image.expose[0].split("/")[0]), (bind, image.expose)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        env.update({k: to_host(v) for k, v in image.env.items()})
        env.update({k: to_host(str(v)) for k, v in service.get("environment", {}).items()})
        # The one change: a test binds its servers to loopback on a free port (the container
        # listens on every interface of its own network namespace instead).
        env["FLOORHAND_API_BIND"] = f"127.0.0.1:{port}"
        argv = [to_host(a) for a in image.entrypoint + image.cmd]
        health_argv = [to_host(a) for a in image.healthcheck]
        assert not missing([argv[0], *health_argv[:2]]), (argv, health_argv)

        code, out = await run_healthcheck(health_argv, env)
        assert code == 1, (code, out)  # nothing listens yet
        assert "not ready" in out, out

        log_path = folder / "floorhand.log"
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                cwd=to_host(image.workdir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:

            async def health() -> tuple[int, str]:
                if proc.returncode is not None:
                    raise AssertionError(f"floorhand exited {proc.returncode}")
                return await run_healthcheck(health_argv, env)

            code, out = await wait_for_condition(
                health,
                READY_TIMEOUT_S,
                what="the image's HEALTHCHECK to pass",
                until=lambda r: r[0] == 0,
                interval_s=0.5,
                context=lambda: log_path.read_text()[-3000:],
            )
            assert out.startswith("200 "), out
            async with httpx.AsyncClient() as client:
                resp = await client.get(f"http://127.0.0.1:{port}/api/v1/ready")
            assert resp.status_code == 200, resp.text
            assert (state / "journal.sqlite").exists(), sorted(p.name for p in state.iterdir())

            grace_s = float(str(service["stop_grace_period"]).removesuffix("s"))
            proc.send_signal(signal.SIGTERM)  # what `stop` sends (STOPSIGNAL SIGTERM)
            assert await asyncio.wait_for(proc.wait(), grace_s) == 0, log_path.read_text()[-3000:]
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        code, out = await run_healthcheck(health_argv, env)
        assert code == 1, (code, out)
    finally:
        broker.stop()


# ----------------------------------------------------------------------------- the compose file
def test_the_compose_file_mounts_what_the_shipped_configs_and_the_image_expect() -> None:
    compose = load_compose()
    services = compose["services"]
    assert set(services) == {"floorhand", "mosquitto", "influxdb", "grafana"}
    image = parse_dockerfile(DOCKERFILE.read_text())
    doc = DEPLOYMENT_DOC.read_text()
    named = set(compose.get("volumes") or {})
    used_named: set[str] = set()
    for name, service in services.items():
        for source, target in bind_mounts(service):
            assert target.startswith("/"), (name, target)
            if "/" not in source:
                assert source in named, f"{name}: volume {source} is not declared"
                used_named.add(source)
            elif source.startswith("./site/"):
                # The site's own files (secrets, site file): documented, never in the repo.
                assert f"deploy/site/{source.removeprefix('./site/')}" in doc, source
            else:
                assert compose_path(source).exists(), f"{name}: {source} does not exist"
                assert compose_path(source).is_relative_to(ROOT), source
    assert used_named == named, "declared volumes nobody mounts"
    for name, spec in compose.get("secrets", {}).items():
        assert spec["file"].startswith("./site/"), name
        assert f"deploy/site/{spec['file'].removeprefix('./site/')}" in doc, name

    # mosquitto: the shipped config, and every file it names inside the container is mounted.
    mosq = services["mosquitto"]
    mosq_mounts = bind_mounts(mosq)
    conf_target = next(t for s, t in mosq_mounts if compose_path(s) == MOSQUITTO_CONF)
    assert f"-c {conf_target}" in " ".join(mosq["entrypoint"])
    targets = [t for _, t in mosq_mounts]
    conf_paths = [
        line.split(None, 1)[1]
        for line in active_lines(MOSQUITTO_CONF.read_text())
        if line.split()[0]
        in ("password_file", "acl_file", "certfile", "keyfile", "cafile", "persistence_location")
    ]
    assert len(conf_paths) >= 6, conf_paths
    for path in conf_paths:
        assert covered(path.rstrip("/"), targets), f"mosquitto.conf names {path}: not mounted"
    # Its persistence folder is handed to the user mosquitto drops to (README: the gotcha).
    persistence = next(
        line.split()[1]
        for line in active_lines(MOSQUITTO_CONF.read_text())
        if line.startswith("persistence_location")
    ).rstrip("/")
    assert f"chown mosquitto:mosquitto {persistence}" in " ".join(mosq["entrypoint"])
    # Loopback listener of the shipped config: the controller shares mosquitto's network.
    assert "listener 1883 127.0.0.1" in active_lines(MOSQUITTO_CONF.read_text())
    assert services["floorhand"]["network_mode"] == "service:mosquitto"
    assert f"{image.expose[0]}:{image.expose[0]}" in mosq["ports"]

    # floorhand: built from this Dockerfile; the journal volume on the image's VOLUME; the
    # site file where CMD looks; the password through the *_FILE convention.
    fh = services["floorhand"]
    assert compose_path(fh["build"]["context"]) / fh["build"]["dockerfile"] == DOCKERFILE
    fh_mounts = dict((t, s) for s, t in bind_mounts(fh))
    assert "/" not in fh_mounts[image.volumes[0]], "the journal must be on a named volume"
    assert image.cmd[-1] in fh_mounts, "the site file CMD names is not mounted"
    for key, value in fh["environment"].items():
        if key.endswith("_FILE"):
            assert value.removeprefix("/run/secrets/") in fh["secrets"], key
    assert "healthcheck" not in fh, "the image's HEALTHCHECK applies"
    assert float(str(fh["stop_grace_period"]).removesuffix("s")) > 5.0  # floorhand: exit in 5 s

    # Grafana: the provisioning files and the dashboards where the provider looks.
    graf = services["grafana"]
    graf_mounts = {compose_path(s): t for s, t in bind_mounts(graf) if "/" in s}
    assert graf_mounts[GRAFANA / "provisioning" / "datasources"].endswith("/datasources")
    assert graf_mounts[GRAFANA / "provisioning" / "dashboards"].endswith("/dashboards")
    provider = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "floorhand.yaml").read_text()
    )
    assert graf_mounts[GRAFANA / "dashboards"] == provider["providers"][0]["options"]["path"]
    assert list((GRAFANA / "dashboards").glob("*.json")), "no dashboards to provision"
    datasource = (GRAFANA / "provisioning" / "datasources" / "floorhand-influxdb.yaml").read_text()
    needed = set(re.findall(r"\$\{(\w+)\}", datasource))
    assert needed
    assert needed <= set(graf["environment"]), needed - set(graf["environment"])
    influx = services["influxdb"]
    assert graf["environment"]["FLOORHAND_INFLUX_DB"] == influx["environment"]["INFLUXDB_DB"]
    assert graf["environment"]["FLOORHAND_INFLUX_URL"] == "http://influxdb:8086"
    assert influx["healthcheck"]["test"][0] == "CMD"


def test_the_dockerfile_copies_only_files_that_exist_and_the_build_context_keeps() -> None:
    image = parse_dockerfile(DOCKERFILE.read_text())
    ignored = [
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert image.all_copy_sources
    for source in image.all_copy_sources:
        path = source.rstrip("/").removeprefix("./")
        assert (ROOT / path).exists(), source
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hits = [p for p in ignored for pre in prefixes if fnmatch(pre, p)]
        assert not hits, f"{source} is excluded by .dockerignore {hits}"
    assert image.healthcheck[1] in image.copies, "the HEALTHCHECK script is not in the image"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_the_compose_file_passes_docker_compose_config(folder: Path) -> None:
    """docker-compose (Debian's 1.29) validates the file against the Compose schema."""

    def config(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "docker-compose",
                "-f",
                str(path),
                "--project-directory",
                str(COMPOSE_DIR),
                "config",
                "-q",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

    result = config(COMPOSE)
    assert result.returncode == 0, result.stderr
    # The check can fail: a misspelt key is refused.
    broken = folder / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    stop_grace_period:", "    stop_grace:"))
    result = config(broken)
    assert result.returncode != 0
    assert "stop_grace" in result.stderr, result.stderr


def first_stage(text: str) -> tuple[str, list[tuple[str, str]], list[str]]:
    """The build stage: its WORKDIR, its COPY (source, destination) pairs and its RUN lines."""
    steps = instructions(text)
    froms = [i for i, (word, _) in enumerate(steps) if word == "FROM"]
    assert len(froms) == 2, "a build stage and a runtime stage"
    workdir, copies, runs = "/", [], []
    for word, args in steps[froms[0] + 1 : froms[1]]:
        if word == "WORKDIR":
            workdir = args
        elif word == "COPY":
            *sources, dest = shlex.split(args)
            copies += [(src, dest) for src in sources]
        elif word == "RUN":
            runs.append(args)
    return workdir, copies, runs


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_build_stage_copies_enough_for_a_complete_wheel(folder: Path) -> None:
    """What the build stage copies into the image is built into the wheel here, as its RUN
    does (pip wheel, build backend isolated): nothing the wheel needs is left out."""
    workdir, copies, runs = first_stage(DOCKERFILE.read_text())
    assert any("pip wheel" in run and "--no-deps" in run for run in runs), runs
    src = folder / workdir.lstrip("/")
    src.mkdir(parents=True)
    for source, dest in copies:
        target = src / dest if not dest.startswith("/") else folder / dest.lstrip("/")
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / source, target)
    out = folder / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = out.glob("floorhand-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    expected = {
        str(p.relative_to(ROOT))
        for package in ("controller", "devices", "simulators")
        for p in (ROOT / package).rglob("*.py")
    }
    expected |= {
        "devices/register_maps/" + p.name for p in (ROOT / "firmware-configs" / "plc").iterdir()
    }
    expected |= {
        "controller/api/dashboard/" + str(p.relative_to(ROOT / "dashboards" / "web"))
        for p in (ROOT / "dashboards" / "web").rglob("*")
        if p.is_file()
    }
    assert not expected - names, sorted(expected - names)[:20]


def test_the_healthcheck_asks_loopback_for_a_wildcard_bind_and_refuses_a_bad_one() -> None:
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "deploy" / "healthcheck.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.target("0.0.0.0:8080") == ("127.0.0.1", 8080)
    assert module.target(":8080") == ("127.0.0.1", 8080)
    assert module.target("[::]:9000") == ("::1", 9000)
    assert module.target("[::1]:9000") == ("::1", 9000)
    assert module.target("10.0.0.5:8080") == ("10.0.0.5", 8080)
    for bad in ("8080", "host:", "host:http"):
        with pytest.raises(ValueError, match="is not HOST:PORT"):
            module.target(bad)
