"""The soak's measurements: a sample of the server's processes and Redis, the summary, and the plot."""
from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path

import psutil
from loadgen import redis_clients, redis_cmd

GAUGE_RX = re.compile(r'^(openhands_greenlets|openhands_open_streams)(\{[^}]*\})? ([0-9.eE+-]+)$', re.M)


def _proc(pid: int, role: str, tree: bool = False) -> dict | None:
    """RSS, fds and CPU seconds of one process (with its children when tree)."""
    try:
        p = psutil.Process(pid)
        ps = [p] + (p.children(recursive=True) if tree else [])
        rss = fds = 0
        cpu = 0.0
        for q in ps:
            with q.oneshot():
                rss += q.memory_info().rss
                fds += q.num_fds()
                t = q.cpu_times()
                cpu += t.user + t.system
        return {"role": role, "pid": pid, "rss_mb": round(rss / 2**20, 1), "fds": fds, "cpu_s": round(cpu, 2)}
    except psutil.Error:
        return None


class Sampler:
    """Takes one sample of everything measured from outside the load (run in a thread: psutil, /metrics, Redis)."""

    def __init__(self, srv, workers, metrics_url: str):
        self.srv, self.workers, self.metrics_url = srv, workers, metrics_url
        self.prev: dict | None = None

    def metrics(self) -> tuple[int | None, dict, int | None]:
        """Greenlets (sum, per pid) and open streams from /metrics; None for a gauge the server does not export."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
                text = r.read().decode()
        except OSError:
            return None, {}, None
        greenlets: dict = {}
        streams = None
        for name, labels, value in GAUGE_RX.findall(text):
            if name == "openhands_greenlets":
                pid = re.search(r'pid="(\d+)"', labels or "")
                greenlets[pid.group(1) if pid else "?"] = int(float(value))
            else:
                streams = (streams or 0) + int(float(value))
        return (sum(greenlets.values()) if greenlets else None), greenlets, streams

    def take(self) -> dict:
        master = self.srv.p.pid
        procs = [_proc(master, "gunicorn master")]
        try:
            kids = sorted(c.pid for c in psutil.Process(master).children())
        except psutil.Error:
            kids = []
        procs += [_proc(pid, "gunicorn worker") for pid in kids]
        procs += [_proc(pid, "agent worker", tree=True) for pid in self.workers.pids]
        procs += [_proc(pid, "redis") for pid in self.srv.redis.pids]
        procs = [p for p in procs if p]
        greenlets, per_pid, server_streams = self.metrics()
        port = self.srv.redis.port
        info = (redis_cmd(port, "INFO", "clients") or b"") + (redis_cmd(port, "INFO", "memory") or b"")
        field = dict(re.findall(rb"^(\w+):([^\r\n]*)", info, re.M))
        busy = psutil.cpu_times()
        now = {"t": time.monotonic(), "loadgen": time.process_time(),
               "machine": sum(busy) - busy.idle - getattr(busy, "iowait", 0.0),
               "server": sum(p["cpu_s"] for p in procs if p["role"].startswith("gunicorn")),
               "agents": sum(p["cpu_s"] for p in procs if p["role"] == "agent worker"),
               "redis": sum(p["cpu_s"] for p in procs if p["role"] == "redis")}
        prev, self.prev = self.prev, now
        dt = (now["t"] - prev["t"]) if prev else 0
        pct = {k: round(100 * (now[k] - prev[k]) / dt, 1) if dt else 0.0 for k in now if k != "t"}
        pct["other"] = round(pct["machine"] - pct["loadgen"] - pct["server"] - pct["agents"] - pct["redis"], 1)
        return {"time_utc": time.strftime("%H:%M:%S", time.gmtime()), "procs": procs,
                "greenlets": greenlets, "greenlets_per_pid": per_pid, "server_open_streams": server_streams,
                "redis_clients": redis_clients([port]),
                "redis_connected_clients": int(field.get(b"connected_clients", b"-1")) - 1,  # minus this one
                "redis_used_memory_mb": round(int(field.get(b"used_memory", b"0")) / 2**20, 2),
                "cpu_pct": pct, "loadavg": [round(x, 2) for x in os.getloadavg()]}


def _at(samples: list[dict], seconds: float) -> dict:
    return min(samples, key=lambda s: abs(s["elapsed_s"] - seconds))


def _per_role(s: dict) -> dict:
    """RSS and fds by process name: master, worker 0.., agent 0.., redis."""
    out, count = {}, {}
    for p in s["procs"]:
        n = count.get(p["role"], 0)
        count[p["role"]] = n + 1
        name = p["role"] if p["role"] in ("gunicorn master", "redis") else f"{p['role']} {n}"
        out[name] = {"rss_mb": p["rss_mb"], "fds": p["fds"], "pid": p["pid"]}
    return out


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per hour: growth, not noise, when it persists."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return round(3600 * sum((x - mx) * (y - my) for x, y in points) / var, 2) if var else None


def trends(samples: list[dict]) -> dict:
    """RSS (MiB/h) and fds (/h) slopes per process from 60 s on (the streams all open), greenlets and Redis too."""
    warm = [s for s in samples if s["elapsed_s"] >= 60] or samples
    names = sorted({n for s in warm for n in _per_role(s)})
    out: dict = {}
    for name in names:
        rows = [(s["elapsed_s"], _per_role(s)[name]) for s in warm if name in _per_role(s)]
        out[name] = {"rss_mb_per_h": slope_per_hour([(x, r["rss_mb"]) for x, r in rows]),
                     "fds_per_h": slope_per_hour([(x, r["fds"]) for x, r in rows]),
                     "rss_mb_min": min(r["rss_mb"] for _, r in rows), "rss_mb_max": max(r["rss_mb"] for _, r in rows)}
    g = [(s["elapsed_s"], s["greenlets"]) for s in warm if s["greenlets"] is not None]
    out["greenlets_per_h"] = slope_per_hour(g)
    out["redis_clients_per_h"] = slope_per_hour([(s["elapsed_s"], s["redis_clients"]) for s in warm
                                                 if s["redis_clients"] is not None])
    out["redis_used_memory_mb_per_h"] = slope_per_hour([(s["elapsed_s"], s["redis_used_memory_mb"]) for s in warm])
    return out


def summarize(data: dict) -> dict:
    """Start (streams open, 60 s), 5 min and end figures per process; totals; ok = nothing lost or duplicated."""
    samples = [s for s in data.get("samples", []) if s["phase"] == "load"] or data.get("samples", [])
    if not samples:
        return {"ok": False, "error": "no samples"}
    points = {"idle (0 s, no stream)": data["samples"][0], "start (60 s)": _at(samples, 60),
              "5 min": _at(samples, 300), "end": samples[-1]}
    checks = data.get("checks", {})
    lost = checks.get("client_missing", 0) + checks.get("acked_not_stored", 0)
    dup = data["streams"]["dup_seen_live"] + checks.get("client_extra", 0)
    per_pid = {p["pid"] for s in samples for p in s["procs"] if p["role"] == "gunicorn worker"}
    out = {
        "points": {name: {"elapsed_s": s["elapsed_s"], "procs": _per_role(s), "greenlets": s["greenlets"],
                          "redis_clients": s["redis_clients"], "redis_used_memory_mb": s["redis_used_memory_mb"],
                          "streams_open": s["streams_open"]} for name, s in points.items()},
        "greenlets_gauge": "present" if any(s["greenlets"] is not None for s in samples) else
        "absent from /metrics: not recorded",
        "gunicorn_worker_pids_seen": len(per_pid),
        "trends_from_60s": trends(samples),
        "lost": lost, "duplicated": dup, "checks": checks, "drained": data.get("drained"),
        "delivered": data["streams"]["delivered"], "streams_opened": data["streams"]["opened"],
        "server_ended_streams": data["streams"]["server_ended"], "open_failures": data["streams"]["open_failures"],
        "posts": data["posts"], "delivery_latency_ms": data["delivery_latency_ms"],
        "cpu_pct_mean": {k: round(sum(s["cpu_pct"][k] for s in samples[1:]) / max(1, len(samples) - 1), 1)
                         for k in samples[-1]["cpu_pct"]},
        "loadavg_max": max(s["loadavg"][0] for s in samples),
    }
    out["ok"] = (lost == 0 and dup == 0 and not any(checks.get(k) for k in (
        "listing_not_consecutive", "acked_not_answered_once", "clients_incomplete"))
        and not data["posts"]["errors"])
    return out


def plot(data: dict, path: Path) -> None:
    """Memory, fds, greenlets, Redis connections and load over time; lost/duplicated in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = data["samples"]
    t = [s["elapsed_s"] / 60 for s in samples]
    fig, ax = plt.subplots(3, 2, figsize=(13, 10), sharex=True)
    names = sorted({n for s in samples for n in _per_role(s)})
    for name in names:
        rows = [(x, _per_role(s).get(name)) for x, s in zip(t, samples)]
        xs = [x for x, r in rows if r]
        ax[0][0].plot(xs, [r["rss_mb"] for _, r in rows if r], label=name)
        ax[0][1].plot(xs, [r["fds"] for _, r in rows if r], label=name)
    ax[0][0].set_title("RSS (MiB) per process")
    ax[0][1].set_title("open fds per process")
    ax[0][0].legend(fontsize=7)
    g = [(x, s["greenlets"]) for x, s in zip(t, samples) if s["greenlets"] is not None]
    if g:
        ax[1][0].plot([x for x, _ in g], [v for _, v in g], label="greenlets (all workers)")
    else:
        ax[1][0].text(0.5, 0.5, "openhands_greenlets absent from /metrics", ha="center", transform=ax[1][0].transAxes)
    ax[1][0].plot(t, [s["streams_open"] for s in samples], label="streams open (clients)")
    ax[1][0].set_title("greenlets and streams open")
    ax[1][0].legend(fontsize=7)
    ax[1][1].plot(t, [s["redis_clients"] for s in samples], label="Redis connections")
    ax[1][1].set_title("Redis connections (CLIENT LIST) / used_memory (MiB)")
    mem = ax[1][1].twinx()
    mem.plot(t, [s["redis_used_memory_mb"] for s in samples], color="tab:red", label="used_memory")
    ax[1][1].legend(fontsize=7, loc="upper left")
    mem.legend(fontsize=7, loc="lower right")
    ax[2][0].plot(t, [s["delivered_per_s"] for s in samples], label="events delivered/s")
    ax[2][0].plot(t, [s["post_latency_ms"].get("p99", float("nan")) for s in samples], label="post p99 ms")
    ax[2][0].set_title("deliveries/s and post latency p99 (ms)")
    ax[2][0].legend(fontsize=7)
    for k in ("loadgen", "server", "agents", "redis", "other"):
        ax[2][1].plot(t, [s["cpu_pct"][k] for s in samples], label=k)
    ax[2][1].set_title("CPU % (100 = one core; 2 cores)")
    ax[2][1].legend(fontsize=7)
    for a in ax[2]:
        a.set_xlabel("minutes")
    end = [s["elapsed_s"] / 60 for s in samples if s["phase"] == "load"]
    for a in ax.flat:
        if end:
            a.axvline(end[-1], color="grey", linestyle=":", linewidth=1)  # posting stopped: the drain follows
    sm = data["summary"]
    fig.suptitle(f"soak {data['started_utc']}: {data['config']['streams']} streams, "
                 f"{data['config']['posts_per_second']:g} posts/s, {data['config']['minutes']:g} min — "
                 f"lost {sm['lost']}, duplicated {sm['duplicated']}, delivered {sm['delivered']:,}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
