"""The service on a real 3-master Redis Cluster: every master used, sharded pub/sub, bounded connections."""
from __future__ import annotations

import collections
import threading
from collections.abc import Iterator

import pytest
import redis

from app import create_app
from app.redis import close, make_client, server_major
from app.store import Store, conv_channel, conv_meta_key

from .conftest import ON_CLUSTER, Api, assert_error, bearer
from .failover import Follower, post_with_retries
from .servers import free_port, wait_until
from .sse_client import open_stream
from .topologies import RedisCluster3, cluster  # noqa: F401 (a fixture, used by name)

SSE = "/api/sse/conversations/{}/events"


@pytest.fixture()
def cluster_store(cluster: RedisCluster3) -> Iterator[Store]:  # noqa: F811
    """The store on the cluster (emptied before and after the test)."""
    cluster.flushall()
    client = make_client(cluster.url, 4, 5)
    yield Store(client)
    close(client)
    cluster.flushall()


@pytest.fixture()
def cluster_api(cluster: RedisCluster3, cluster_store: Store, start_server) -> tuple[object, Api]:  # noqa: F811
    """One gevent worker on the cluster, and alice's client."""
    server = start_server(redis_url=cluster.url, REDIS_POOL_SIZE="8", SSE_MAX_STREAMS_PER_USER="500")
    return server, Api(server.base, cluster_store.create_api_key("alice")[1])


def cluster_major(topology: RedisCluster3) -> int:
    """The Redis major version the cluster runs."""
    client = topology.client()
    try:
        return server_major(client)
    finally:
        client.close()


def ids_of(events) -> list[int]:
    """The ids of conversation events (named events left out)."""
    return [int(ev.id) for ev in events if ev.id is not None]


def connections_by_role(cluster: RedisCluster3, pid: int) -> dict[tuple[str, int], collections.Counter]:  # noqa: F811
    """Per master, the connections worker `pid` holds there, counted by role (pool, hub-pubsub, ...)."""
    out = {}
    for host, port in cluster.nodes:
        node = redis.Redis(host=host, port=port, socket_timeout=5)
        try:
            names = [c["name"] for c in node.client_list() if c["name"].startswith(f"oh-sse:{pid}:")]
        finally:
            node.close()
        out[(host, port)] = collections.Counter(name.rsplit(":", 1)[1] for name in names)
    return out


def test_conversations_of_one_worker_land_on_every_master_and_each_stream_gets_its_events(
        cluster: RedisCluster3, cluster_api) -> None:  # noqa: F811
    server, api = cluster_api
    cids = [api.create() for _ in range(24)]
    masters = {cluster.master_of(conv_meta_key(cid)) for cid in cids}
    assert masters == set(cluster.nodes)  # 24 random ids: all three masters hold some
    streams = {cid: open_stream(server.port, SSE.format(cid), bearer(api.key)) for cid in cids}
    for s in streams.values():
        assert s.take(1)[0].event == "connection"
    for _ in range(3):
        for cid in cids:
            api.post(cid)
    for cid, s in streams.items():
        assert ids_of(s.take(3, timeout=10)) == [0, 1, 2], cid  # every event once, in order, on every master


def test_two_hundred_streams_over_a_hundred_conversations_hold_a_fixed_number_of_connections(
        cluster: RedisCluster3, cluster_api) -> None:  # noqa: F811
    server, api = cluster_api
    pid = server.worker_pids()[0]
    cids = [api.create() for _ in range(100)]
    opened = []
    for count in (10, 100):
        for cid in cids[len(opened) // 2:count]:
            for _ in range(2):
                opened.append(open_stream(server.port, SSE.format(cid), bearer(api.key)))
                assert opened[-1].take(1)[0].event == "connection"
        held = connections_by_role(cluster, pid)
        # The hub's are fixed: one pub/sub connection (per master with sharded pub/sub, else one in
        # all) and one control connection per master; the pool's are the requests' (at most 8 per master).
        sharded = cluster_major(cluster) >= 7
        pubsub = sum(roles["hub-pubsub"] for roles in held.values())
        assert pubsub == (3 if sharded else 1), held
        for roles in held.values():
            assert roles["hub-control"] <= 1 and roles["hub-topology"] <= 1 and roles["pool"] <= 8, held
            assert sum(roles.values()) <= 1 + 1 + 1 + 8, held
    assert len(opened) == 200
    for cid in cids:
        api.post(cid)
    for i, s in enumerate(opened):
        assert ids_of(s.take(1, timeout=10)) == [0], cids[i // 2]


def test_announcements_use_sharded_pubsub_on_redis_7(cluster: RedisCluster3, cluster_api) -> None:  # noqa: F811
    server, api = cluster_api
    if cluster_major(cluster) < 7:
        pytest.skip("Redis 6.2 has no sharded pub/sub: PUBLISH is broadcast, one listener hears every channel")
    cid = api.create()
    stream = open_stream(server.port, SSE.format(cid), bearer(api.key))
    assert stream.take(1)[0].event == "connection"
    channel = conv_channel(cid)
    owner = cluster.master_of(channel)
    for host, port in cluster.nodes:
        node = redis.Redis(host=host, port=port, socket_timeout=5)
        try:
            if (host, port) == owner:  # followed on the master of its slot (the others would redirect)
                assert node.execute_command("PUBSUB", "SHARDNUMSUB", channel) == [channel.encode(), 1]
            assert node.execute_command("PUBSUB", "NUMSUB", channel) == [channel.encode(), 0]  # no classic channel
        finally:
            node.close()
    api.post(cid)
    assert ids_of(stream.take(1)) == [0]


def test_pubsub_connections_killed_on_every_master_while_posting_lose_and_repeat_nothing(
        cluster: RedisCluster3, cluster_api) -> None:  # noqa: F811
    server, api = cluster_api
    cids = [api.create() for _ in range(9)]
    streams = [open_stream(server.port, SSE.format(cid), bearer(api.key)) for cid in cids]
    for s in streams:
        assert s.take(1)[0].event == "connection"

    def kill_pubsub() -> int:
        killed = 0
        for host, port in cluster.nodes:
            node = redis.Redis(host=host, port=port, socket_timeout=5)
            try:
                killed += node.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            finally:
                node.close()
        return killed

    for round_ in range(8):
        for cid in cids:
            api.post(cid)
        if round_ in (2, 5):
            wait_until(lambda: kill_pubsub() >= 1, 10, what="the hub's pub/sub connections to kill")
    for cid, s in zip(cids, streams, strict=True):
        assert ids_of(s.take(8, timeout=15)) == list(range(8)), cid


@pytest.mark.timeout(300)
def test_a_master_failover_loses_no_acknowledged_event_and_its_streams_resume(tmp_path, start_server) -> None:
    """Kill the master of one conversation (REDIS_MIN_REPLICAS_ACK=1): its replica takes over, the hub follows."""
    topology = RedisCluster3(tmp_path / "cluster", replicas=True).start()
    client = make_client(topology.url, 4, 5)
    followers: list[Follower] = []
    try:
        store = Store(client)
        key = store.create_api_key("sam")[1]
        cids = {}
        while len(cids) < 2:  # one conversation on the master to kill, one on another master
            cid = store.new_conversation_id()
            master = topology.master_of(conv_meta_key(cid))
            if master == topology.nodes[0] and "doomed" not in cids:
                cids["doomed"] = cid
            elif master != topology.nodes[0] and "other" not in cids:
                cids["other"] = cid
            else:
                continue
            store.create_conversation("sam", cid, repository=None, branch=None, title="t", initial_user_msg=None)
        server = start_server(redis_url=topology.url, REDIS_MIN_REPLICAS_ACK="1", REDIS_REPLICAS_ACK_TIMEOUT_MS="500",
                              REDIS_TIMEOUT_SECONDS="1", SSE_MAX_STREAMS_PER_USER="0")
        total, before_kill = 30, 10
        acked = {name: {} for name in cids}
        refused: dict[str, list] = {name: [] for name in cids}
        followers.extend(Follower(server.port, cid, key) for cid in cids.values() for _ in range(3))
        posters = [threading.Thread(target=post_with_retries, args=(Api(server.base, key), cid, total, acked[name],
                                                                    refused[name])) for name, cid in cids.items()]
        for poster in posters:
            poster.start()
        wait_until(lambda: len(acked["doomed"]) >= before_kill, 30, what="posts before the failover")
        topology.kill_node(topology.nodes[0][1])
        wait_until(lambda: topology.master_of(conv_meta_key(cids["doomed"])) != topology.nodes[0], 30,
                   what="the replica to take over")
        topology.restart_node(topology.nodes[0][1])  # back as a replica, so that WAIT 1 can be met again
        topology.wait_healthy(60)
        for poster in posters:
            poster.join(160)
        for name in cids:
            assert len(acked[name]) == total, (name, len(acked[name]), refused[name][-12:][::-1])
            assert sorted(acked[name].values()) == list(range(total))  # every post stored once, none lost
        for follower in followers:
            wait_until(lambda f=follower: len(f.ids) >= total or f.error, 60, what="every event on every stream")
        for follower in followers:
            follower.stop()
            assert follower.error is None and follower.ids == list(range(total)), (follower.ids, follower.error)
    finally:
        for follower in followers:
            follower.stop()
        close(client)
        topology.stop()


def test_a_worker_starts_while_the_cluster_is_unreachable_and_answers_503_until_it_answers() -> None:
    app = create_app({"REDIS_URL": f"redis+cluster://127.0.0.1:{free_port()}", "TESTING": True,
                      "REDIS_TIMEOUT_SECONDS": 0.5})
    try:
        answer = app.test_client().get("/api/conversations", headers=bearer("ohk_0123456789abcdef_x"))
        body = assert_error(answer, 503, "redis_unavailable")
        assert answer.headers["Retry-After"] == "1" and "Cluster" not in body["message"]
        assert_error(app.test_client().get("/readyz"), 503, "redis_unavailable")
    finally:
        close(app.extensions["redis"])


def test_pipelines_over_two_masters_in_opposite_orders_never_wait_on_each_other(cluster: RedisCluster3) -> None:  # noqa: F811
    """One connection per master and pipelines that meet the masters in opposite orders: all finish, none times out."""
    cluster.flushall()
    tags = {}
    for n in range(200):  # a hash tag on each of two different masters
        tags.setdefault(cluster.master_of(f"{{t{n}}}"), f"{{t{n}}}")
    first, second = list(tags.values())[:2]
    client = make_client(cluster.url, 1, 2)  # one connection per master: a hold-and-wait would block
    errors: list[BaseException] = []

    def run(keys: tuple[str, str]) -> None:
        try:
            for i in range(200):
                pipe = client.pipeline(transaction=False)
                pipe.set(f"{keys[0]}a", i)
                pipe.get(f"{keys[1]}b")
                pipe.incr(f"{keys[1]}n")
                pipe.execute()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    threads = [threading.Thread(target=run, args=(order,)) for order in ((first, second), (second, first)) * 2]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(t.is_alive() for t in threads) and not errors, errors[:3]
        # Each INCR ran once (two threads a key): nothing re-sent.
        assert (int(client.get(f"{first}n")), int(client.get(f"{second}n"))) == (400, 400)
    finally:
        close(client)
        cluster.flushall()


def test_an_append_asked_to_spublish_on_a_redis_older_than_7_publishes_and_stores_once(redis_server, redis_client):
    """A Cluster mid-upgrade: the script falls back to PUBLISH where SPUBLISH does not exist, instead of failing."""
    if ON_CLUSTER or server_major(redis_client) >= 7:
        pytest.skip("needs a single Redis older than 7 (the embedded 6.2)")
    store = Store(make_client(redis_server.url, 2, 5))
    store._publish = "SPUBLISH"  # what a worker decides when every master it saw ran 7
    try:
        cid = store.new_conversation_id()
        store.create_conversation("ann", cid, repository=None, branch=None, title="t", initial_user_msg=None)
        listener = redis_client.pubsub()
        listener.subscribe(conv_channel(cid))
        assert listener.get_message(timeout=5)["type"] == "subscribe"
        assert store.append_event("ann", cid, {"type": "note"}, source="user") == (0, False)
        message = listener.get_message(timeout=5)
        assert message["type"] == "message" and message["data"].startswith(b'{"id":0,')
        assert redis_client.xlen(f"conv:{{{cid}}}:events") == 1
        listener.close()
    finally:
        close(store.redis)


def test_streams_opened_while_the_hub_is_being_made_share_it(cluster: RedisCluster3, cluster_store: Store,  # noqa: F811
                                                             start_server) -> None:
    """The first streams arrive while the hub asks the masters' versions (made slow here): one hub, one listener."""
    server = start_server(redis_url=cluster.url, wsgi_app="tests.wsgi_slow_hub:app", SSE_MAX_STREAMS_PER_USER="0")
    api = Api(server.base, cluster_store.create_api_key("alice")[1])
    cids = [api.create() for _ in range(10)]
    streams: list = []
    threads = [threading.Thread(target=lambda c=cid: streams.append(open_stream(server.port, SSE.format(c),
                                                                                 bearer(api.key))))
               for cid in cids for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(streams) == 50 and all(s.take(1)[0].event == "connection" for s in streams)
    sharded = cluster_major(cluster) >= 7
    held = connections_by_role(cluster, server.worker_pids()[0])
    assert sum(roles["hub-pubsub"] for roles in held.values()) == (3 if sharded else 1), held
    for cid in cids:
        api.post(cid)
    assert all(ids_of(s.take(1, timeout=10)) == [0] for s in streams)
