"""A real nginx for the tests: deploy/nginx.conf rendered with free loopback ports and a certificate made here."""
from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from .servers import ROOT, free_port, stop_group, wait_until
from .sse_client import SSEStream, start_stream

SITE_TEMPLATE = ROOT / "deploy" / "nginx.conf"
IN_CI = os.environ.get("CI", "").lower() == "true"
PLACEHOLDER = re.compile(r"__[A-Z0-9_]+__")
# A second loopback address for the client, so that its address differs from nginx's own.
CLIENT_ADDRESS = "127.0.0.2"
# Stands for Debian's /etc/nginx/nginx.conf: the main context, with every path inside the test's
# folder (no root-only path); the site itself is deploy/nginx.conf, included as it is rendered.
# Debian's own access log (`combined`) is here too: the site's access_log replaces it for its servers.
MAIN_CONF = """\
{user}
worker_processes 1;
events {{ worker_connections 1024; }}
http {{
    access_log {work}/debian-access.log combined;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    include {work}/site.conf;
}}
"""


def nginx_binary() -> str:
    """Debian's nginx; a skip without it (a failure in CI, where .ci/run installs it)."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found is None:
        if IN_CI:
            pytest.fail("nginx is missing in CI (.ci/run installs it)")
        pytest.skip("nginx is not installed; .ci/run installs it (or: apt-get install nginx)")
    return found


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and its key), made with the openssl command."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", str(key),
         "-out", str(cert), "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def render_site(values: dict[str, str]) -> str:
    """deploy/nginx.conf with each __NAME__ replaced; every placeholder must be given."""
    text = SITE_TEMPLATE.read_text()
    wanted = set(PLACEHOLDER.findall(text))
    given = {f"__{name}__" for name in values}
    assert wanted == given, f"deploy/nginx.conf wants {sorted(wanted)}, the test gives {sorted(given)}"
    return PLACEHOLDER.sub(lambda match: values[match.group(0)[2:-2]], text)


class Nginx:
    """nginx in the foreground (no daemon) on free loopback ports, in front of the given gunicorn addresses."""

    def __init__(self, workdir: Path, cert: Path, key: Path, upstreams: list[str], stream_read_timeout: str = "60s"):
        self.workdir = workdir
        self.http_port = free_port()
        self.https_port = free_port()
        # The template names two servers; one gunicorn given stands in both places.
        first, second = (upstreams * 2)[:2] if len(upstreams) < 2 else upstreams[:2]
        self.values = {
            "SERVER_NAME": "127.0.0.1", "PUBLIC_HOST": f"127.0.0.1:{self.https_port}",
            "LISTEN_HTTP": f"127.0.0.1:{self.http_port}",
            "LISTEN_HTTPS": f"127.0.0.1:{self.https_port}", "TLS_CERTIFICATE": str(cert),
            "TLS_CERTIFICATE_KEY": str(key), "UPSTREAM_1": first, "UPSTREAM_2": second,
            "STREAM_READ_TIMEOUT": stream_read_timeout, "ACCESS_LOG": str(workdir / "access.log"),
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> Nginx:
        """Write the configuration, start nginx and wait until both ports take connections."""
        work = self.workdir
        work.mkdir(parents=True, exist_ok=True)
        (work / "logs").mkdir(exist_ok=True)
        (work / "site.conf").write_text(render_site(self.values))
        # As root, nginx's workers would run as `nobody`, who cannot enter pytest's 0700 folders.
        user = "user root;" if os.geteuid() == 0 else ""
        (work / "nginx.conf").write_text(MAIN_CONF.format(user=user, work=work))
        binary = nginx_binary()
        command = [binary, "-p", str(work), "-e", str(work / "error.log"), "-c", str(work / "nginx.conf")]
        checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
        with open(work / "stderr.log", "ab") as stderr:
            self.proc = subprocess.Popen(
                [*command, "-g", f"daemon off; pid {work / 'nginx.pid'};"],
                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
            )
        for port in (self.http_port, self.https_port):
            wait_until(lambda port=port: self._accepts(port), 15, what=f"nginx on port {port}")
        return self

    def _accepts(self, port: int) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {self.error_log()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    @property
    def base(self) -> str:
        """https://127.0.0.1:<https port>: the site's public host, which port 80 redirects to."""
        return f"https://{self.values['PUBLIC_HOST']}"

    def error_log(self) -> str:
        """What nginx logged as errors (and on stderr)."""
        return "".join(p.read_text(errors="replace") for p in (self.workdir / "error.log",
                                                                 self.workdir / "stderr.log") if p.exists())

    def access_log(self) -> list[str]:
        """The site's access log lines (`openhands`: address, connection, protocol, status, "method path", ...)."""
        path = self.workdir / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def stop(self) -> None:
        """Fast shutdown (TERM); the whole group is killed if it lingers."""
        if self.proc is None:
            return
        stop_group(self.proc, 10)
        self.proc = None


def tls_context(cert: Path) -> ssl.SSLContext:
    """A client context that trusts only the test's certificate (verified, for 127.0.0.1)."""
    context = ssl.create_default_context(cafile=str(cert))
    context.set_alpn_protocols(["http/1.1"])
    return context


def open_tls_stream(port: int, path: str, context: ssl.SSLContext, headers: dict[str, str] | None = None,
                    source: str = "127.0.0.1", timeout: float = 10.0) -> SSEStream:
    """GET `path` over TLS + HTTP/1.1 from address `source` (what a browser's EventSource sends); head read."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
    return start_stream(sock, port, path, headers, timeout)


def session_cookie_attributes(response: httpx.Response) -> set[str]:
    """The attributes of the one session cookie set, lower-cased."""
    (cookie,) = [v for v in response.headers.get_list("set-cookie") if v.startswith("oh_session=")]
    return {part.strip().lower() for part in cookie.split(";")[1:]}


def access_log_addresses(path: Path, what: str) -> list[str]:
    """The client addresses of gunicorn's access log lines that contain `what`."""
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.split()[0] for line in lines if what in line]
