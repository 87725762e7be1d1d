"""Test certificates made at test time with the openssl command line: a CA, a server
certificate for 127.0.0.1 / localhost, a client certificate, and an unrelated second CA."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path  # signed nothing here: a wrong CA for the broker's certificate

    def mosquitto_listener(self, port: int, *, require_client_cert: bool = False) -> str:
        """mosquitto.conf lines for a TLS listener on 127.0.0.1:``port``."""
        lines = [
            f"listener {port} 127.0.0.1",
            f"cafile {self.ca_cert}",
            f"certfile {self.server_cert}",
            f"keyfile {self.server_key}",
        ]
        if require_client_cert:
            lines.append("require_certificate true")
        return "\n".join(lines)


def _run(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    _run(
        "req", "-x509", *_EC, "-keyout", str(key), "-out", str(cert), "-days", "2",
        "-subj", f"/CN=Floorhand test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    return key, cert


def _issue(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    ext = folder / f"{name}.ext"
    ext.write_text(extensions + "\n")
    _run("req", *_EC, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=folder)
    _run(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
        cwd=folder,
    )  # fmt: skip
    return cert, key


def make_test_pki(folder: Path) -> Pki:
    """Create every file under ``folder`` (a few hundred ms with EC keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(folder, "ca")
    _, other_ca = _make_ca(folder, "other-ca")
    server = _issue(
        folder,
        "server",
        ca,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
        "basicConstraints=CA:FALSE",
    )
    client = _issue(folder, "client", ca, "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE")
    return Pki(ca[1], server[0], server[1], client[0], client[1], other_ca)
