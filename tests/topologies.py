"""Real Redis Cluster and Sentinel topologies on loopback, built with redis-py only (no redis-cli), and fixtures."""
from __future__ import annotations

import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster
import redis.crc
import redis.sentinel

from .servers import free_port, redis_server_binary, wait_until

HOST = "127.0.0.1"
SLOTS = 16384
MASTER_NAME = "mymaster"
# Cluster nodes' ports come from below the kernel's ephemeral range (32768+ here and on most Linux), so that neither
# a node's port nor its bus port (port + 10000) can be taken by some outgoing connection between our check and bind.
CLUSTER_PORT_RANGE = (10000, 22000)
START_ATTEMPTS = 3  # a port may still be taken between the check and the bind (another run): retry on new ports
_RANDOM = random.SystemRandom()  # not the global generator: a test that seeds it must not make runs pick alike

# Redis 7 syncs replicas diskless by default and first waits 5 s for more replicas to join the same transfer; and a
# Redis 7 cluster leaves a replica out of CLUSTER SLOTS while its replication offset is 0, which on an idle master
# only moves with the master's ping to its replicas (every 10 s by default).
REPLICATION_OPTS = ["--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1"]


class ProcessExited(RuntimeError):
    """A server exited while starting (most likely: its port or bus port was taken in the meantime)."""


def _bindable(port: int) -> bool:
    """Whether a TCP port on loopback can be bound now."""
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def cluster_ports(count: int) -> list[int]:
    """`count` distinct ports p such that p and its cluster bus port p + 10000 are both free now (and below 65535)."""
    ports: list[int] = []
    while len(ports) < count:
        port = _RANDOM.randint(*CLUSTER_PORT_RANGE)
        if port in ports or port + 10000 in ports or port - 10000 in ports:
            continue
        if _bindable(port) and _bindable(port + 10000):
            ports.append(port)
    return ports


def _answers(client: redis.Redis) -> bool:
    """Whether a server answers PING (any error, e.g. still starting or refused, is a no)."""
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _info_field(client: redis.Redis, command: str, field: str) -> str | None:
    """One `field:value` line of a raw INFO-like reply (CLUSTER INFO, INFO replication), as text."""
    raw = client.execute_command(*command.split())
    if isinstance(raw, dict):  # redis-py parsed it (INFO does, by command name): same fields, typed values
        value = raw.get(field)
        return None if value is None else str(value)
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return value.strip()
    return None


def _text(value: Any) -> Any:
    """Bytes to str, recursively through lists (replies differ with decode_responses and parsers)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list | tuple):
        return [_text(v) for v in value]
    return value


def _wait_answers(proc: subprocess.Popen, port: int, log: Path, what: str) -> None:
    """Wait until the server on `port` answers PING; fail at once, pointing at its log, if its process exits."""
    client = redis.Redis(host=HOST, port=port, socket_timeout=1)

    def answers() -> bool:
        if proc.poll() is not None:
            raise ProcessExited(f"{what} on port {port} exited with {proc.returncode}; see {log}")
        return _answers(client)

    try:
        wait_until(answers, 15, what=f"{what} on port {port}")
    finally:
        client.close()


def _stop_processes(procs: list[subprocess.Popen]) -> None:
    """SIGTERM all at once (they shut down in parallel), then SIGKILL whatever has not exited within 10 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class RedisCluster3:
    """A real 3-master Redis Cluster on loopback (optionally one replica per master), slots split evenly."""

    def __init__(self, workdir: Path, replicas: bool = False, node_timeout_ms: int = 2000):
        self.workdir = workdir
        self.replicas = replicas
        # Short node timeout: a replica notices a dead master (and tests that kill one finish) within seconds.
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []  # masters first, then replicas (replica i follows master i)
        self.procs: dict[int, subprocess.Popen] = {}
        self.node_ids: dict[int, str] = {}
        self.startup_seconds: float | None = None

    @property
    def master_ports(self) -> list[int]:
        """The masters' ports as started (a replica's failover is not tracked here)."""
        return self.ports[:3]

    @property
    def nodes(self) -> list[tuple[str, int]]:
        """The masters' (host, port)."""
        return [(HOST, port) for port in self.master_ports]

    @property
    def replica_nodes(self) -> list[tuple[str, int]]:
        """The replicas' (host, port), empty without replicas."""
        return [(HOST, port) for port in self.ports[3:]]

    @property
    def url(self) -> str:
        """redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3 (the masters)."""
        return "redis+cluster://" + ",".join(f"{host}:{port}" for host, port in self.nodes)

    def _node(self, port: int, **kwargs: Any) -> redis.Redis:
        """A plain (non-cluster) client of one node."""
        return redis.Redis(host=HOST, port=port, **{"socket_timeout": 5, **kwargs})

    def start(self) -> RedisCluster3:
        """Start the nodes, assign slots, introduce them and wait until all agree the cluster is ok."""
        began = time.monotonic()
        for attempt in range(START_ATTEMPTS):
            self.ports = cluster_ports(6 if self.replicas else 3)
            try:
                self._spawn()
                break
            except ProcessExited:
                # A node that could not bind exits at once: try again on other ports.
                self.stop()
                if attempt == START_ATTEMPTS - 1:
                    raise
            except BaseException:
                self.stop()
                raise
        try:
            self._form()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _spawn(self) -> None:
        """Start one redis-server per port, each in its own dir with its own nodes.conf; wait until they answer."""
        for port in self.ports:
            self._spawn_node(port)
        for port in self.ports:
            _wait_answers(self.procs[port], port, self.workdir / f"node-{port}" / "redis.log", "cluster node")

    def _spawn_node(self, port: int) -> None:
        node_dir = self.workdir / f"node-{port}"
        node_dir.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [redis_server_binary(), "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
             "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
             "--cluster-node-timeout", str(self.node_timeout_ms), "--dir", str(node_dir),
             "--logfile", str(node_dir / "redis.log"), "--daemonize", "no", *REPLICATION_OPTS],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def restart_node(self, port: int) -> None:
        """Start a killed node again on its port and nodes.conf: it rejoins (a failed-over master as a replica)."""
        self._spawn_node(port)
        _wait_answers(self.procs[port], port, self.workdir / f"node-{port}" / "redis.log", "cluster node")

    def wait_healthy(self, timeout: float = 30) -> None:
        """Until every node says the cluster is ok and every master has its replica in sync again."""
        clients = {port: self._node(port, socket_timeout=2) for port in self.ports}
        try:
            wait_until(lambda: self._agreed(clients), timeout, interval=0.1, what="the cluster to be whole again")
        finally:
            for client in clients.values():
                client.close()

    def _form(self) -> None:
        """What redis-cli --cluster create does, by hand: epochs, slots, MEET, REPLICATE, then wait for agreement."""
        clients = {port: self._node(port) for port in self.ports}
        try:
            version = clients[self.ports[0]].info("server")["redis_version"]
            ranged = int(str(version).split(".")[0]) >= 7  # ADDSLOTSRANGE is 7.0+
            for index, port in enumerate(self.ports):
                client = clients[port]
                self.node_ids[port] = _text(client.execute_command("CLUSTER", "MYID"))
                # Distinct config epochs up front, as redis-cli does: no epoch-collision round before the map settles.
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
            for index, port in enumerate(self.master_ports):
                first, last = index * SLOTS // 3, (index + 1) * SLOTS // 3 - 1
                if ranged:
                    clients[port].execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
                else:
                    for batch in range(first, last + 1, 1000):
                        clients[port].execute_command("CLUSTER", "ADDSLOTS", *range(batch, min(batch + 1000, last + 1)))
            # One node meeting all others is enough: gossip introduces the rest to each other.
            for port in self.ports[1:]:
                clients[self.ports[0]].execute_command("CLUSTER", "MEET", HOST, port)
            if self.replicas:
                for master, replica in zip(self.master_ports, self.ports[3:], strict=True):
                    # REPLICATE needs the replica to know its master's id already: wait for gossip first.
                    wait_until(lambda r=replica, m=master: self.node_ids[m] in _text(
                        clients[r].execute_command("CLUSTER", "NODES")), 15, what=f"node {replica} to learn {master}")
                    clients[replica].execute_command("CLUSTER", "REPLICATE", self.node_ids[master])
            wait_until(lambda: self._agreed(clients), 30, interval=0.1, what="the cluster to agree on its slot map")
        finally:
            for client in clients.values():
                client.close()

    def _agreed(self, clients: dict[int, redis.Redis]) -> bool:
        """Every node says ok, knows every node, and reports the same complete slot map (replicas included)."""
        maps = []
        for client in clients.values():
            try:
                if _info_field(client, "CLUSTER INFO", "cluster_state") != "ok":
                    return False
                if _info_field(client, "CLUSTER INFO", "cluster_known_nodes") != str(len(self.ports)):
                    return False
                replica = _info_field(client, "INFO replication", "role") == "slave"  # after a failover: any node
                if replica and _info_field(client, "INFO replication", "master_link_status") != "up":
                    return False
                maps.append(self._slot_map(client))
            except redis.RedisError:
                return False
        want_servers = 2 if self.replicas else 1
        first = maps[0]
        return (sum(end - start + 1 for start, end, _ in first) == SLOTS
                and all(len(servers) == want_servers for _, _, servers in first)
                and all(m == first for m in maps))

    @staticmethod
    def _slot_map(client: redis.Redis) -> list[tuple[int, int, list[tuple[str, int]]]]:
        """CLUSTER SLOTS normalised: sorted (start, end, [master, replicas...]) with (host, port) only."""
        # Asked as two words: redis-py then applies no parsing callback and the reply stays CLUSTER SLOTS' own.
        raw = _text(client.execute_command("CLUSTER", "SLOTS"))
        result = []
        for entry in raw:
            start, end, master, *replicas = entry
            servers = [(master[0], int(master[1]))] + sorted((r[0], int(r[1])) for r in replicas)
            result.append((int(start), int(end), servers))
        return sorted(result)

    def slot_map(self) -> list[tuple[int, int, list[tuple[str, int]]]]:
        """The current slot map as the first answering master sees it: (start, end, [master, replicas...])."""
        for port in self.ports:
            client = self._node(port, socket_timeout=2)
            try:
                return self._slot_map(client)
            except redis.RedisError:
                continue
            finally:
                client.close()
        raise redis.ConnectionError("no cluster node answers")

    def master_of(self, key: str | bytes) -> tuple[str, int]:
        """The (host, port) of the master that holds this key's slot now."""
        slot = redis.crc.key_slot(key.encode() if isinstance(key, str) else key)
        for start, end, servers in self.slot_map():
            if start <= slot <= end:
                return servers[0]
        raise LookupError(f"slot {slot} is not served")

    def client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        """A redis-py cluster client on the masters (kwargs go to RedisCluster, e.g. decode_responses=True)."""
        startup = [redis.cluster.ClusterNode(host, port) for host, port in self.nodes]
        return redis.cluster.RedisCluster(startup_nodes=startup, **kwargs)

    def flushall(self) -> None:
        """FLUSHALL on every current master (replicas follow; they refuse writes)."""
        masters = {servers[0] for _, _, servers in self.slot_map()}
        for host, port in masters:
            client = redis.Redis(host=host, port=port, socket_timeout=5)
            try:
                client.flushall()
            finally:
                client.close()

    def kill_node(self, port: int) -> None:
        """SIGKILL one node (to test what clients do when a master dies)."""
        proc = self.procs.get(port)
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)

    def stop(self) -> None:
        """Stop every node: SIGTERM, then SIGKILL after 10 s; leaves no process behind."""
        _stop_processes(list(self.procs.values()))
        self.procs = {}


class Sentinel3:
    """One master, one replica and three sentinels (quorum 2) on loopback, failing over in seconds."""

    def __init__(self, workdir: Path, down_after_ms: int = 1000, failover_timeout_ms: int = 5000):
        self.workdir = workdir
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.server_ports: list[int] = []  # [first master, first replica]
        self.sentinel_ports: list[int] = []
        self.procs: dict[int, subprocess.Popen] = {}
        self.startup_seconds: float | None = None
        self._sentinel: redis.sentinel.Sentinel | None = None

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """The sentinels' (host, port)."""
        return [(HOST, port) for port in self.sentinel_ports]

    @property
    def url(self) -> str:
        """redis+sentinel://127.0.0.1:s1,127.0.0.1:s2,127.0.0.1:s3/mymaster."""
        return "redis+sentinel://" + ",".join(f"{h}:{p}" for h, p in self.sentinels) + f"/{MASTER_NAME}"

    def start(self) -> Sentinel3:
        """Start master, replica and sentinels; wait until replication is up and every sentinel knows everyone."""
        began = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _spawn(self, port: int, args: list[str], log: Path, what: str) -> None:
        """Start one redis-server process and wait until it answers PING."""
        self.procs[port] = subprocess.Popen([redis_server_binary(), *args], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
        _wait_answers(self.procs[port], port, log, what)

    def _start(self) -> None:
        """The start-up itself; start() stops everything if any of it fails."""
        self.server_ports = [free_port(), free_port()]
        while self.server_ports[1] == self.server_ports[0]:
            self.server_ports[1] = free_port()
        for port in self.server_ports:
            node_dir = self.workdir / f"redis-{port}"
            node_dir.mkdir(parents=True, exist_ok=True)
            self._spawn(port, ["--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                               "--dir", str(node_dir), "--logfile", str(node_dir / "redis.log"), "--daemonize", "no",
                               *REPLICATION_OPTS],
                        node_dir / "redis.log", "redis")
        master, replica = self.server_ports
        with redis.Redis(host=HOST, port=replica, socket_timeout=5) as client:
            client.execute_command("REPLICAOF", HOST, master)
            wait_until(lambda: _info_field(client, "INFO replication", "master_link_status") == "up", 15,
                       what="the replica's link to its master")
        while len(self.sentinel_ports) < 3:
            port = free_port()
            if port not in self.server_ports and port not in self.sentinel_ports:
                self.sentinel_ports.append(port)
        for port in self.sentinel_ports:
            sentinel_dir = self.workdir / f"sentinel-{port}"
            sentinel_dir.mkdir(parents=True, exist_ok=True)
            conf = sentinel_dir / "sentinel.conf"  # its own and writable: Sentinel rewrites it (ids, epochs, peers)
            conf.write_text("\n".join([
                f"port {port}", f"bind {HOST}", "daemonize no", f'dir "{sentinel_dir}"',
                f'logfile "{sentinel_dir / "sentinel.log"}"',
                f"sentinel monitor {MASTER_NAME} {HOST} {master} 2",
                f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
                f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {MASTER_NAME} 1",
            ]) + "\n")
            self._spawn(port, [str(conf), "--sentinel"], sentinel_dir / "sentinel.log", "sentinel")
        # Sentinels find the replica through the master's INFO and each other through hello messages every 2 s.
        wait_until(self._sentinels_know_everyone, 30, interval=0.1, what="every sentinel to know the replica and peers")

    def _sentinel_client(self, port: int) -> redis.Redis:
        """A plain client of one sentinel (its commands are SENTINEL ...)."""
        return redis.Redis(host=HOST, port=port, socket_timeout=2, decode_responses=True)

    def _sentinels_know_everyone(self) -> bool:
        """Whether each sentinel lists the replica and the two other sentinels for mymaster."""
        replica = self.server_ports[1]
        for port in self.sentinel_ports:
            with self._sentinel_client(port) as client:
                try:
                    replicas = client.execute_command("SENTINEL", "REPLICAS", MASTER_NAME)
                    peers = client.execute_command("SENTINEL", "SENTINELS", MASTER_NAME)
                except redis.RedisError:
                    return False
            if not any(int(r["port"]) == replica and "s_down" not in r["flags"] for r in replicas):
                return False
            if {int(p["port"]) for p in peers} != set(self.sentinel_ports) - {port}:
                return False
        return True

    def _addresses(self) -> list[tuple[str, int] | None]:
        """What each sentinel names as mymaster's address (None where it does not answer)."""
        answers: list[tuple[str, int] | None] = []
        for port in self.sentinel_ports:
            with self._sentinel_client(port) as client:
                try:
                    host, master_port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
                    answers.append((host, int(master_port)))
                except (redis.RedisError, TypeError, ValueError):
                    answers.append(None)
        return answers

    def master_address(self) -> tuple[str, int]:
        """The master's (host, port) as most sentinels name it now."""
        named = [a for a in self._addresses() if a]
        if not named:
            raise redis.ConnectionError("no sentinel names a master")
        return max(set(named), key=named.count)

    def _is_master(self, address: tuple[str, int]) -> bool:
        """Whether the server at that address answers ROLE as a master."""
        client = redis.Redis(host=address[0], port=address[1], socket_timeout=1)
        try:
            return _text(client.execute_command("ROLE"))[0] == "master"
        except redis.RedisError:
            return False
        finally:
            client.close()

    def kill_master(self) -> tuple[str, int]:
        """SIGKILL the current master's process (no shutdown, no goodbye) and return its address."""
        address = self.master_address()
        proc = self.procs[address[1]]
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        return address

    def restart(self, address: tuple[str, int]) -> None:
        """Start a killed server again on its port (empty: no persistence), as a replica of the current master.

        As an operator would: started bare, the empty server is a master until the sentinels turn
        it into a replica, and a failover in that moment could make the others copy its emptiness.
        """
        port = address[1]
        master_host, master_port = self.master_address()
        node_dir = self.workdir / f"redis-{port}"
        self._spawn(port, ["--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                           "--dir", str(node_dir), "--logfile", str(node_dir / "redis.log"), "--daemonize", "no",
                           "--replicaof", master_host, str(master_port), *REPLICATION_OPTS],
                    node_dir / "redis.log", "redis")

    def wait_replicas(self, count: int, timeout: float = 30) -> None:
        """Wait until the current master has `count` replicas whose link is up."""
        def ready() -> bool:
            try:
                host, port = self.master_address()
                with redis.Redis(host=host, port=port, socket_timeout=1) as client:
                    return int(_info_field(client, "INFO replication", "connected_slaves") or 0) >= count
            except redis.RedisError:
                return False
        wait_until(ready, timeout, interval=0.2, what=f"{count} replica(s) of the master")

    def wait_failover(self, old: tuple[str, int], timeout: float = 20) -> tuple[str, int]:
        """Wait until all three sentinels name the same new master and it answers ROLE as master; return it."""
        def done() -> tuple[str, int] | None:
            named = self._addresses()
            new = named[0]
            if new and new != old and all(a == new for a in named) and self._is_master(new):
                return new
            return None
        return wait_until(done, timeout, interval=0.1, what=f"a failover away from {old[0]}:{old[1]}")

    def sentinel(self) -> redis.sentinel.Sentinel:
        """The topology's one redis-py Sentinel on the three sentinels (stop() closes its connections)."""
        # Shared, not one per call: the clients it keeps on each sentinel are never closed by the master or replica
        # clients it hands out, and an unclosed socket is a ResourceWarning, which this suite turns into an error.
        if self._sentinel is None:
            self._sentinel = redis.sentinel.Sentinel(self.sentinels, socket_timeout=2)
        return self._sentinel

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client of the current master, found through redis.sentinel.Sentinel."""
        return self.sentinel().master_for(MASTER_NAME, socket_timeout=5, **kwargs)

    def replica_client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client of a replica, found through redis.sentinel.Sentinel."""
        return self.sentinel().slave_for(MASTER_NAME, socket_timeout=5, **kwargs)

    def stop(self) -> None:
        """Stop sentinels first (no failover while the servers go), then the servers; leaves no process behind."""
        _stop_processes([self.procs[p] for p in self.sentinel_ports if p in self.procs])
        _stop_processes([self.procs[p] for p in self.server_ports if p in self.procs])
        self.procs = {}
        if self._sentinel is not None:
            for client in self._sentinel.sentinels:
                client.close()
            self._sentinel = None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster3]:
    """A 3-master Redis Cluster for one test module; stopped at its teardown, even when a test failed."""
    topology = RedisCluster3(tmp_path_factory.mktemp("cluster"))
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sentinel3]:
    """A master, a replica and three sentinels for one test module; stopped at its teardown, even when a test failed."""
    topology = Sentinel3(tmp_path_factory.mktemp("sentinel"))
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()
