"""Settings that would break a promise are refused at start, with a message naming them."""
from __future__ import annotations

import pytest

from app.config import ConfigError, load_settings


@pytest.mark.parametrize("option", ["retry_on_timeout=true", "retry_on_error=TimeoutError", "Retry_On_Timeout=1"])
def test_a_redis_url_asking_for_blind_retries_is_refused_at_start(option):
    with pytest.raises(ConfigError, match="never re-sent"):
        load_settings({"REDIS_URL": f"redis://127.0.0.1:1/0?{option}"})
