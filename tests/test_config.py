"""Settings that would break a promise are refused at start, with a message naming them."""
from __future__ import annotations

import pytest

from app.config import ConfigError, load_settings
from app.redis import cluster_url


@pytest.mark.parametrize("option", ["retry_on_timeout=true", "retry_on_error=TimeoutError", "Retry_On_Timeout=1"])
def test_a_redis_url_asking_for_blind_retries_is_refused_at_start(option):
    with pytest.raises(ConfigError, match="never re-sent"):
        load_settings({"REDIS_URL": f"redis://127.0.0.1:1/0?{option}"})


@pytest.mark.parametrize("url", [
    "redis+cluster://10.0.0.1:7000",
    "redis+cluster://10.0.0.1:7000,10.0.0.2:7001,node-3",
    "redis+cluster://app:s3cret@10.0.0.1:7000/?socket_keepalive=true",
    "rediss+cluster://10.0.0.1:7000",
    "redis+sentinel://10.0.0.1:26379,10.0.0.2/mymaster/2",
])
def test_cluster_and_sentinel_urls_are_taken(url):
    assert load_settings({"REDIS_URL": url})["REDIS_URL"] == url


def test_a_cluster_url_names_its_nodes_options_and_credentials():
    target = cluster_url("redis+cluster://app:p%40ss@10.0.0.1:7000,node-2/?socket_keepalive=true")
    assert target.nodes == (("10.0.0.1", 7000), ("node-2", 6379))
    assert target.options["username"] == "app" and target.options["password"] == "p@ss"
    assert target.options["socket_keepalive"] is True
    assert cluster_url("redis://10.0.0.1:6379/0") is None


@pytest.mark.parametrize(("url", "message"), [
    ("redis+cluster://10.0.0.1:7000/3", "only database 0"),
    ("redis+cluster://:7000", "host:port"),
    ("redis+cluster://10.0.0.1:7000?retry_on_timeout=true", "never re-sent"),
    ("redis+sentinel://10.0.0.1:26379", "service_name"),
    ("memcached://10.0.0.1", "redis\\+cluster://"),
])
def test_a_bad_cluster_or_sentinel_url_is_refused_at_start_with_the_reason(url, message):
    with pytest.raises(ConfigError, match=message):
        load_settings({"REDIS_URL": url})
