"""Every setting of the service: read from the environment once, validated, with its default."""
from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .redis import CLUSTER_SCHEMES, cluster_url, sentinel_url

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_REDIS_SOCKET = PROJECT_ROOT / "var" / "redis.sock"
SECRET_KEY_FILE = PROJECT_ROOT / "var" / "secret_key"


class ConfigError(ValueError):
    """A setting has a value the service cannot run with."""


def _int(minimum: int, maximum: int | None = None) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise ConfigError(f"{name} must be {bound}, got {value}")
        return value

    return parse


def _float(minimum: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if not value >= minimum:
            raise ConfigError(f"{name} must be >= {minimum}, got {raw}")
        return value

    return parse


def _str(name: str, raw: str) -> str:
    return raw


def _redis_url(name: str, raw: str) -> str:
    scheme = urlsplit(raw).scheme
    if scheme not in ("redis", "rediss", "unix", "redis+sentinel", *CLUSTER_SCHEMES):
        raise ConfigError(f"{name} must be a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL")
    try:
        sentinel_url(raw)
        cluster_url(raw)
    except ValueError as err:
        raise ConfigError(f"{name}: {err}") from None
    options = {key.lower() for key in parse_qs(urlsplit(raw).query)}
    refused = sorted(options & {"retry_on_timeout", "retry_on_error", "retry"})
    if refused:
        raise ConfigError(
            f"{name} must not set {', '.join(refused)}: a command that may have run is never re-sent "
            "(only failures to connect are retried)"
        )
    return raw


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if raw.lower() not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
        return raw.lower()

    return parse


def _token(name: str, raw: str) -> str:
    # The value is never echoed: a typo in a secret must not land in a log.
    if raw and (len(raw) < 16 or any(c.isspace() for c in raw)):
        raise ConfigError(f"{name} must be at least 16 characters without spaces (or empty)")
    return raw


# An origin as browsers send it: scheme, host (a name, an IPv4 or a bracketed IPv6 address), port.
ORIGIN = re.compile(r"https?://(?:[a-z0-9.-]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")


def _origins(name: str, raw: str) -> tuple[str, ...]:
    # Without its scheme's default port, as browsers send it.
    items = tuple(dict.fromkeys(re.sub(r"^(http://.*):80$|^(https://.*):443$", r"\1\2", o.strip().lower())
                                for o in raw.split(",") if o.strip()))
    for origin in items:
        if not ORIGIN.fullmatch(origin):
            raise ConfigError(f"{name} must be comma-separated exact origins such as https://app.example.com "
                              f"(scheme, host, optional port; no path, no '*'), got {origin!r}")
    return items


def _providers(name: str, raw: str) -> tuple[str, ...]:
    items = tuple(sorted({p.strip() for p in raw.split(",") if p.strip()}))
    if not items:
        raise ConfigError(f"{name} must name at least one provider type")
    return items


# name -> (default, parser, meaning). The README's configuration table is this list.
SETTINGS: dict[str, tuple[str, Callable[[str, str], Any], str]] = {
    "REDIS_URL": (
        f"unix://{EMBEDDED_REDIS_SOCKET}",
        _redis_url,
        "Redis to use (redis://, rediss://, unix://, redis+sentinel://, redis+cluster://); unset: the embedded "
        "Redis that the run command starts (var/redis.sock)",
    ),
    "REDIS_MIN_REPLICAS_ACK": (
        "0", _int(0, 100), "replicas that must confirm an event (WAIT) before its post is answered; 0: none",
    ),
    "REDIS_REPLICAS_ACK_TIMEOUT_MS": (
        "1000", _int(1, 60_000), "how long a post waits for those replicas before it answers 503",
    ),
    "REDIS_POOL_SIZE": ("16", _int(2, 10_000), "Redis connections per worker for requests, at most"),
    "REDIS_TIMEOUT_SECONDS": ("5", _float(0.1), "socket timeout of a Redis command made for a request"),
    "MAX_EVENT_BYTES": ("262144", _int(64), "largest JSON body the API takes (413 beyond)"),
    "REQUEST_BODY_TIMEOUT_SECONDS": (
        "30", _float(0.1), "a request body must arrive whole within this long of the request's head (408 beyond)",
    ),
    "RESPONSE_WRITE_TIMEOUT_SECONDS": (
        "30", _float(0), "a client that acknowledges under 4 KiB of a response's waiting bytes in this long is "
        "disconnected (event streams excepted: SSE_STALL_SECONDS); 0: off",
    ),
    "EVENT_RETENTION": ("0", _int(0), "events kept per conversation, oldest trimmed first; 0 keeps all"),
    "IDEMPOTENCY_TTL_SECONDS": ("86400", _int(1), "how long an Idempotency-Key is remembered"),
    "SSE_HEARTBEAT_SECONDS": ("15", _float(0.05), "idle time after which a stream sends ': ping'"),
    "SSE_RETRY_MS": ("3000", _int(0), "reconnection delay sent to clients in the 'retry:' line"),
    "SSE_MAX_STREAMS_PER_USER": ("100", _int(0), "open streams per user, across workers; 0: no cap"),
    "POST_RATE_LIMIT": (
        "600", _int(0, 1_000_000), "posts (new conversations and events) per API key per minute, across workers "
        "and hosts, in bursts of up to as many; 429 rate_limited beyond; 0: no limit",
    ),
    # 300: over twice SSE_MAX_STREAMS_PER_USER's 100, with margin, so a user holding the full cap on
    # one key can reopen every stream twice in a minute (a deploy, then a proxy's idle timeout):
    # a 429 ends a browser's EventSource for good.
    "STREAM_RATE_LIMIT": (
        "300", _int(0, 1_000_000), "stream opens per API key per minute, across workers and hosts, in bursts of up "
        "to as many; 429 rate_limited beyond; 0: no limit",
    ),
    "SSE_LEASE_SECONDS": (
        "30", _float(3), "a stream's slot under the per-user cap outlives a killed worker by at most this long",
    ),
    "SSE_QUEUE_MAX": ("2000", _int(1), "events a slow stream may fall behind before it is ended"),
    "SSE_STALL_SECONDS": (
        "60", _float(0), "a stream whose client has taken none of its bytes for this long (a write blocked) is "
        "ended; 0: never",
    ),
    "SSE_COALESCE_MS": (
        "4", _float(0), "after writing an event to 200+ streams, wait this long to batch the next; 0: never",
    ),
    "PROVIDERS": ("github,gitlab,bitbucket", _providers, "provider types accepted in providers_set"),
    "SECRET_KEY": (
        "", _str, "signs session cookies; the same on every host. Empty: the one in SECRET_KEY_FILE",
    ),
    "SECRET_KEY_FILE": (
        str(SECRET_KEY_FILE), _str, "where the cookie secret is kept when SECRET_KEY is empty (made if missing)",
    ),
    "SESSION_MAX_AGE_SECONDS": ("604800", _int(60), "lifetime of the session cookie"),
    "CORS_ORIGINS": (
        "", _origins, "comma-separated origins (https://app.example.com) whose pages may call the API with "
        "credentials (CORS); empty: none, no CORS headers at all. The session cookie (SameSite=Lax) reaches the "
        "API only from same-site ones",
    ),
    "TRUSTED_PROXIES": (
        "0", _int(0, 10), "proxies in front whose X-Forwarded-For/-Proto/-Host are believed (werkzeug's ProxyFix); "
        "0: none. Set it only when nothing but those proxies can reach gunicorn",
    ),
    "LOG_FORMAT": (
        "text", _choice("text", "json"), "app log lines (one per request and per stream end, and the rest): json (one "
        "object per line, for production) or text (for a terminal)",
    ),
    "METRICS_TOKEN": (
        "", _token, "GET /metrics answers loopback callers only; set, also callers sending 'Authorization: Bearer "
        "<token>' (16+ characters; never logged)",
    ),
    "GREENLET_COUNT_SECONDS": (
        "60", _int(0, 86_400), "how often a gunicorn worker counts its greenlets for openhands_greenlets: a walk "
        "over every object Python's collector tracks, which pauses the worker about 100 ms per million (a worker "
        "holding 20,000 streams tracks about 1.5 million); a scrape answers with the last count. 0: counted at "
        "each scrape a worker answers, never in between",
    ),
    "AGENT": (
        "auto", _str, "the agent that answers: echo, readme, llm, auto (readme for conversations with a repository, "
        "echo for the others) or module:Class",
    ),
    "AGENT_WORKERS": ("1", _int(0, 64), "agent worker processes the run command starts beside gunicorn; 0: none"),
    "AGENT_CONCURRENCY": ("32", _int(1, 10_000), "conversations one agent worker answers at once"),
    "AGENT_SHARDS": (
        "8", _int(1, 1024), "work queue shards (agent:work:{n}); the same on every API host and agent worker",
    ),
    "AGENT_CLAIM_IDLE_SECONDS": (
        "15", _float(0.5), "a dead worker's conversation is taken over after this long (its lease and work entry)",
    ),
    "AGENT_STEP_TIMEOUT_SECONDS": ("300", _float(0.1), "longest an agent may take for one event before its run errs"),
    "AGENT_HISTORY_EVENTS": ("500", _int(1, 100_000), "newest events of the conversation handed to the agent"),
    "AGENT_WORKSPACE": (
        str(PROJECT_ROOT / "var" / "workspace"), _str, "readme agent: where repositories are (<workspace>/owner/name)",
    ),
    "AGENT_GIT_BASE_URL": (
        "", _str, "readme agent: a missing repository is cloned from <base>/owner/name (git); empty: never clone",
    ),
    "AGENT_GIT_TIMEOUT_SECONDS": ("120", _float(1), "readme agent: longest a git clone may take before it is killed"),
    "AGENT_METRICS_PORT": (
        "0", _int(0, 65535), "an agent worker serves its Prometheus metrics on 127.0.0.1:<port>/metrics (the run "
        "command gives its n-th worker port+n); 0: off",
    ),
    "AGENT_LLM_BASE_URL": ("", _str, "llm agent: an OpenAI-compatible server, e.g. http://127.0.0.1:11434/v1"),
    "AGENT_LLM_MODEL": ("", _str, "llm agent: the model name sent to that server"),
    "AGENT_LLM_API_KEY": ("", _str, "llm agent: its API key (sent as a Bearer token; never logged)"),
    "AGENT_LLM_TIMEOUT_SECONDS": ("60", _float(1), "llm agent: connect and read timeout of each request"),
}


def load_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read and validate every setting from the environment (or the mapping given)."""
    environ = os.environ if environ is None else environ
    settings: dict[str, Any] = {}
    for name, (default, parse, _meaning) in SETTINGS.items():
        raw = environ.get(name, "")
        settings[name] = parse(name, raw.strip() if raw.strip() else default)
    return settings


def redacted_url(url: str) -> str:
    """The Redis URL with any password masked, for logs."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        creds, _, host = rest.rpartition("@")
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user + ':' if user else ''}***@{host}"
    return url


def secret_from_file(path: Path) -> str:
    """The secret kept in `path`, made first (random, mode 0600) if there is none.

    Every worker of a host reads the same file, so they agree whatever happens to Redis; the
    file is made under a temporary name and linked into place, so two workers starting at once
    end up with the same secret.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(48) + "\n")
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another worker made it first: use theirs
            finally:
                tmp.unlink()
        secret = path.read_text().strip()
    except OSError as err:
        raise ConfigError(
            f"SECRET_KEY is empty and the cookie secret file {path} cannot be made or read ({err.strerror}); "
            "set SECRET_KEY, or SECRET_KEY_FILE to a writable path"
        ) from None
    if not secret:
        raise ConfigError(f"the cookie secret file {path} is empty; delete it to make a new one, or set SECRET_KEY")
    return secret
