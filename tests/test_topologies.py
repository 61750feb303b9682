"""The Cluster and Sentinel fixtures are what they claim: real topologies that shard, script, publish and fail over."""
from __future__ import annotations

import time

import pytest
import redis
import redis.crc
import redis.sentinel

from .servers import wait_until
from .topologies import RedisCluster3, Sentinel3, cluster, sentinel  # noqa: F401 (fixtures, used by name)

STREAM_FIELDS = {"kind": "message", "body": "hello"}


def _major(client: redis.Redis | redis.cluster.RedisCluster) -> int:
    """The server's major version (7 has sharded pub/sub and ADDSLOTSRANGE, 6.2 has neither)."""
    info = client.info("server")
    if "redis_version" not in info:  # the cluster client answers per node: any one will do, they run one binary
        info = next(iter(info.values()))
    return int(str(info["redis_version"]).split(".")[0])


def _tags_on_distinct_masters(topology: RedisCluster3) -> dict[tuple[str, int], str]:
    """One hash tag per master, found by asking the slot map (not hard-coded: the split is the fixture's business)."""
    found: dict[tuple[str, int], str] = {}
    for index in range(1000):
        tag = f"conv{index}"
        found.setdefault(topology.master_of(f"{{{tag}}}"), tag)
        if len(found) == 3:
            return found
    raise AssertionError("no three hash tags on three masters")


def _next_message(pubsub: redis.client.PubSub, sharded: bool = False) -> dict | None:
    """The next (sharded) message on a subscription, polled for up to 5 s."""
    def received() -> dict | None:
        get = pubsub.get_sharded_message if sharded else pubsub.get_message
        message = get(ignore_subscribe_messages=True, timeout=0.1)
        return message if message and message["type"] in ("message", "smessage") else None
    return wait_until(received, 5, interval=0, what="a published message")


def test_the_cluster_agrees_on_three_masters_and_its_url_names_them(cluster: RedisCluster3) -> None:  # noqa: F811
    """Three masters split all 16384 slots; the URL names exactly those nodes."""
    slot_map = cluster.slot_map()
    assert sum(end - start + 1 for start, end, _ in slot_map) == 16384
    assert sorted({servers[0] for _, _, servers in slot_map}) == sorted(cluster.nodes)
    assert cluster.url == "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for _, port in cluster.nodes)


def test_three_hash_tags_land_on_three_masters(cluster: RedisCluster3) -> None:  # noqa: F811
    """Keys written through the cluster client sit on the master master_of names, and on no other."""
    cluster.flushall()
    tags = _tags_on_distinct_masters(cluster)
    client = cluster.client(decode_responses=True)
    try:
        for tag in tags.values():
            client.set(f"{{{tag}}}:title", tag)
        for (host, port), tag in tags.items():
            with redis.Redis(host=host, port=port, decode_responses=True) as node:
                assert node.dbsize() == 1
                # READONLY-free direct read: this node owns the slot, so it answers instead of redirecting.
                assert node.get(f"{{{tag}}}:title") == tag
    finally:
        client.close()
    cluster.flushall()
    for host, port in cluster.nodes:
        with redis.Redis(host=host, port=port) as node:
            assert node.dbsize() == 0


def test_a_lua_script_over_one_hash_tag_runs(cluster: RedisCluster3) -> None:  # noqa: F811
    """A script touching several keys of one hash tag runs atomically on their master; two tags are refused."""
    client = cluster.client(decode_responses=True)
    script = "redis.call('SET', KEYS[1], ARGV[1]); return {redis.call('INCR', KEYS[2]), redis.call('GET', KEYS[1])}"
    try:
        assert client.eval(script, 2, "{conv:a}:title", "{conv:a}:seq", "hi") == [1, "hi"]
        assert client.eval(script, 2, "{conv:a}:title", "{conv:a}:seq", "again") == [2, "again"]
        assert redis.crc.key_slot(b"{conv:a}") != redis.crc.key_slot(b"{conv:b}")
        with pytest.raises(redis.exceptions.RedisClusterException, match="same key slot"):  # redis-py refuses
            client.eval(script, 2, "{conv:a}:title", "{conv:b}:seq", "x")
        host, port = cluster.master_of("{conv:a}")
        with redis.Redis(host=host, port=port) as node, pytest.raises(redis.ResponseError, match="same slot"):
            node.eval(script, 2, "{conv:a}:title", "{conv:b}:seq", "x")  # and so does the server (CROSSSLOT)
    finally:
        client.close()


def test_plain_publish_reaches_a_subscriber_on_another_node(cluster: RedisCluster3) -> None:  # noqa: F811
    """Classic PUBLISH is broadcast over the cluster bus: a subscriber on node 1 hears a publish on node 2."""
    (sub_host, sub_port), (pub_host, pub_port) = cluster.nodes[0], cluster.nodes[1]
    subscriber = redis.Redis(host=sub_host, port=sub_port, decode_responses=True)
    publisher = redis.Redis(host=pub_host, port=pub_port, decode_responses=True)
    pubsub = subscriber.pubsub()
    try:
        pubsub.subscribe("events")
        wait_until(lambda: pubsub.get_message(timeout=0.1), 5, interval=0, what="the subscribe confirmation")
        publisher.publish("events", "across")
        assert _next_message(pubsub)["data"] == "across"
    finally:
        pubsub.close()
        subscriber.close()
        publisher.close()


def test_sharded_pubsub_works_on_redis_7(cluster: RedisCluster3) -> None:  # noqa: F811
    """SSUBSCRIBE/SPUBLISH through the cluster client; a node not owning the channel's slot redirects."""
    client = cluster.client(decode_responses=True)
    try:
        if _major(client) < 7:
            pytest.skip("Redis 6.2 has no sharded pub/sub (SPUBLISH/SSUBSCRIBE are 7.0+)")
        channel = "{conv:a}:live"
        pubsub = client.pubsub()
        try:
            pubsub.ssubscribe(channel)
            wait_until(lambda: pubsub.get_sharded_message(timeout=0.1), 5, interval=0, what="the ssubscribe reply")
            assert client.spublish(channel, "sharded") == 1
            assert _next_message(pubsub, sharded=True)["data"] == "sharded"
        finally:
            pubsub.close()
        owner = cluster.master_of(channel)
        other = next(node for node in cluster.nodes if node != owner)
        with redis.Redis(host=other[0], port=other[1]) as node, pytest.raises(redis.exceptions.MovedError) as moved:
            node.execute_command("SPUBLISH", channel, "wrong node")
        assert (moved.value.host, moved.value.port) == owner
    finally:
        client.close()


def test_a_stream_with_a_hash_tag(cluster: RedisCluster3) -> None:  # noqa: F811
    """XADD/XRANGE on a hash-tagged stream key through the cluster client; the stream lives on its slot's master."""
    client = cluster.client(decode_responses=True)
    key = "{conv:s}:events"
    try:
        first = client.xadd(key, STREAM_FIELDS)
        second = client.xadd(key, {**STREAM_FIELDS, "body": "again"})
        assert client.xrange(key) == [(first, STREAM_FIELDS), (second, {**STREAM_FIELDS, "body": "again"})]
        host, port = cluster.master_of(key)
        with redis.Redis(host=host, port=port) as node:
            assert node.xlen(key) == 2
    finally:
        client.close()


def test_the_replica_has_a_write_once_wait_acks_it(sentinel: Sentinel3) -> None:  # noqa: F811
    """A write on the master, acknowledged by WAIT 1, is readable on the replica (found through the sentinels)."""
    assert sentinel.url.endswith("/mymaster") and sentinel.url.startswith("redis+sentinel://127.0.0.1:")
    master = sentinel.client(decode_responses=True)
    replica = sentinel.replica_client(decode_responses=True)
    try:
        assert isinstance(master.connection_pool, redis.sentinel.SentinelConnectionPool)  # asks, never a fixed address
        master.set("before", "v1")
        assert master.execute_command("WAIT", 1, 1000) == 1
        assert replica.get("before") == "v1"
        assert replica.execute_command("ROLE")[0] == "slave"
    finally:
        master.close()
        replica.close()


def test_a_killed_master_fails_over_and_keeps_acked_writes(sentinel: Sentinel3) -> None:  # noqa: F811
    """SIGKILL the master: within 20 s the sentinels promote the replica, which has the WAIT-acked write and writes."""
    master = sentinel.client(decode_responses=True)
    try:
        master.set("acked", "kept")
        assert master.execute_command("WAIT", 1, 1000) == 1
    finally:
        master.close()
    old = sentinel.kill_master()
    began = time.monotonic()
    new = sentinel.wait_failover(old, timeout=20)
    took = time.monotonic() - began
    assert new != old and took < 20
    assert sentinel.master_address() == new
    master = sentinel.client(decode_responses=True)
    try:
        assert master.execute_command("ROLE")[0] == "master"
        assert master.get("acked") == "kept"
        assert master.set("after", "written")
        assert master.get("after") == "written"
    finally:
        master.close()


def test_a_cluster_with_replicas_replicates_and_fails_over(tmp_path) -> None:
    """replicas=True: each master has a replica in the slot map; SIGKILL a master and its replica takes its slots."""
    topology = RedisCluster3(tmp_path, replicas=True)
    try:
        topology.start()
        assert all(len(servers) == 2 for _, _, servers in topology.slot_map())
        key = "{conv:r}:events"
        client = topology.client(decode_responses=True)
        try:
            client.xadd(key, STREAM_FIELDS)
        finally:
            client.close()
        old = topology.master_of(key)
        replica = next(servers[1] for _, _, servers in topology.slot_map() if servers[0] == old)
        with redis.Redis(host=old[0], port=old[1]) as node:
            assert node.execute_command("WAIT", 1, 1000) == 1
        topology.kill_node(old[1])
        # Node timeout 2 s, then failure reports must reach most masters by gossip (1-5 s), then the election (~1 s).
        wait_until(lambda: topology.master_of(key) == replica, 20, interval=0.1, what="the replica to take over")
        client = topology.client(decode_responses=True)
        try:
            assert client.xlen(key) == 1
            assert client.xadd(key, STREAM_FIELDS)
        finally:
            client.close()
    finally:
        topology.stop()
