"""A 3-master Redis Cluster on loopback for the benchmark (standard library only: raw RESP over sockets)."""
from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path

SLOTS = 16384
HOST = "127.0.0.1"


def _encode(*args: object) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def command(port: int, *args: object, timeout: float = 2.0) -> bytes:
    """One command on a fresh connection; the raw reply (enough to read simple and bulk replies)."""
    with socket.create_connection((HOST, port), timeout) as sock:
        sock.sendall(_encode(*args))
        buf = b""
        deadline = time.time() + timeout
        while time.time() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            if buf[:1] in (b"+", b"-", b":") and buf.endswith(b"\r\n"):
                break
            if buf[:1] == b"$":
                head, _, rest = buf.partition(b"\r\n")
                if int(head[1:]) < 0 or len(rest) >= int(head[1:]) + 2:
                    break
        return buf


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
            return True
        except OSError:
            return False


def cluster_ports(count: int = 3) -> list[int]:
    """Free ports below the ephemeral range whose cluster bus ports (+10000) are free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(10000, 22000)
        if port not in ports and _bindable(port) and _bindable(port + 10000):
            ports.append(port)
    return ports


def _bulk(reply: bytes) -> str:
    return reply.partition(b"\r\n")[2].rsplit(b"\r\n", 1)[0].decode()


class Cluster:
    """Three masters with slots split evenly, no replicas; `url` is redis+cluster://."""

    def __init__(self, binary: str, logdir: Path, ports: list[int], maxclients: int = 19900):
        self.ports = ports
        self.maxclients = maxclients
        self.procs: list[subprocess.Popen] = []
        self.logs = []
        for port in ports:
            node_dir = logdir / f"cluster-{port}"
            node_dir.mkdir(parents=True, exist_ok=True)
            log = open(node_dir / "redis.log", "w")
            self.logs.append(log)
            self.procs.append(subprocess.Popen(
                [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                 "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                 "--dir", str(node_dir), "--maxclients", str(maxclients), "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        try:
            self._form()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in self.ports)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _form(self) -> None:
        deadline = time.time() + 20
        for port in self.ports:
            while True:
                try:
                    if command(port, "PING").startswith(b"+PONG"):
                        break
                except OSError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"cluster node {port} did not start")
                time.sleep(0.05)
        for index, port in enumerate(self.ports):
            command(port, "CLUSTER", "SET-CONFIG-EPOCH", index + 1)
            first, last = index * SLOTS // 3, (index + 1) * SLOTS // 3 - 1
            for start in range(first, last + 1, 2000):
                command(port, "CLUSTER", "ADDSLOTS", *range(start, min(start + 2000, last + 1)), timeout=5)
        for port in self.ports[1:]:
            command(self.ports[0], "CLUSTER", "MEET", HOST, port)
        while time.time() < deadline + 20:
            infos = [_bulk(command(port, "CLUSTER", "INFO")) for port in self.ports]
            if all("cluster_state:ok" in i and "cluster_known_nodes:3" in i for i in infos):
                return
            time.sleep(0.1)
        raise RuntimeError("the benchmark's cluster did not agree on its slots")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for log in self.logs:
            log.close()
