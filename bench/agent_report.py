"""The bench's results: a row's records turned into its figures and checks, and the Markdown tables."""
from __future__ import annotations

import time

from agent_procs import KIND, STATES, say

NOISY_PCT = 25.0  # other jobs' CPU (% of a core) that makes a row noisy (✱): waited out before, rerun once after


def pct(sorted_vals: list[float], p: float) -> float | None:
    """The p-th percentile of already sorted values (nearest rank); None if there are none."""
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def dist_ms(vals: list[float]) -> dict:
    """Seconds as a millisecond distribution: n, p50, p90, p99, max, min."""
    v = sorted(x * 1000 for x in vals)
    r = lambda x: None if x is None else round(x, 2)  # noqa: E731
    return {"n": len(v), "p50": r(pct(v, 50)), "p90": r(pct(v, 90)), "p99": r(pct(v, 99)),
            "max": r(v[-1] if v else None), "min": r(v[0] if v else None)}


def delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """The change of each counter from a to b (those that changed only)."""
    return {k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b)) if b.get(k, 0) - a.get(k, 0)}


def runtime_commands(raw: dict[str, int], per_post: dict[str, float], posts: int, inner: set[str],
                     actions: int) -> dict:
    """The runtime's commands per action: the bench's (its posts, one INFO) taken out."""
    own = {k: v * posts for k, v in per_post.items()}
    own["info"] = own.get("info", 0) + 1  # the first snapshot's INFO is in the second one's counts
    rt = {k: v - own.get(k, 0) for k, v in raw.items()}
    rt = {k: round(v) for k, v in rt.items() if round(v) != 0 and k not in ("xlen",)}  # xlen: the bench's
    top = {k: v for k, v in rt.items() if k not in inner}
    scr = {k: v for k, v in rt.items() if k in inner}
    n = max(actions, 1)
    per = lambda d: {k: round(v / n, 3) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}  # noqa: E731
    # Which scripts the runtime's EVALSHAs were, from the commands only one script calls:
    # acquire (ok) ends with XREVRANGE; finish calls LLEN once; emit and finish PUBLISH once each;
    # acquire (every one past the 'gone' check) and finish call LINDEX once (so do not the others).
    finishes = rt.get("llen", 0)
    acquire_ok = rt.get("xrevrange", 0)
    emits = rt.get("publish", 0) + rt.get("spublish", 0) - finishes
    acquires = rt.get("lindex", 0) - finishes
    other_evalsha = rt.get("evalsha", 0) + rt.get("eval", 0) - acquires - emits - finishes
    scripts = {"acquire_ok": acquire_ok, "acquire_not_ok (idle/busy)": acquires - acquire_ok, "emit": emits,
               "finish": finishes, "other (renew, release, delta)": other_evalsha}
    # Round trips: xack and xdel of a work entry go in one pipeline; the heartbeat's renews go in one
    # pipeline, which redis-py opens with a SCRIPT EXISTS (so: 2 trips per heartbeat that renews;
    # SCRIPT is otherwise only a first use's SCRIPT LOAD).
    pipelines = sum(v for k, v in rt.items() if k.split("|")[0] == "script")  # 'script|exists' on Redis 7
    trips = sum(top.values()) - rt.get("xdel", 0) - max(other_evalsha, 0) + pipelines
    return {
        "top_level_per_action": round(sum(top.values()) / n, 3),
        "round_trips_per_action_approx": round(trips / n, 3),
        "script_internal_per_action": round(sum(scr.values()) / n, 3),
        "total_per_action": round(sum(rt.values()) / n, 3),
        "with_bench_posts_per_action": round((sum(raw.values()) - 1) / n, 3),
        "top_level": per(top), "script_internal": per(scr),
        "evalsha_by_script_per_action": {k: round(v / n, 3) for k, v in scripts.items()},
        "raw_delta": raw, "bench_posts": posts,
    }


class RowResults:
    """What a row measured, from its posts, the subscriber's records and the store (mixed into Row)."""

    # A mixin rather than functions: it reads the row's state (args, warm, cids, cpu_settled, per_post,
    # inner, usec0/usec1, other_by_second, ctl), which Row (agent_measure) sets up.

    def _report(self, posts, recs, before, after, cpu, t0, t_posted, t_last, per_worker) -> None:
        r = self.result
        warm, n_all = self.warm, len(posts)
        win = range(warm, n_all)  # the measured posts (after the warm-up)
        n = len(win)
        bench_posts_in_window = n if (self.scenario == "latency" or self.args.burst_mode == "live") else 0
        ts, cids, ids, kinds, causes = recs
        index = {(cid, eid): k for k, (cid, eid, *_rest) in enumerate(posts)}
        first, answer, ended, heard = ([None] * n_all for _ in range(4))
        counts = [[0, 0, 0] for _ in range(n_all)]
        stray = 0
        for t, cid, eid, kind, cause in zip(ts, cids, ids, kinds, causes):
            if kind == "u":
                k = index.get((cid, eid))
                if k is not None:
                    heard[k] = t
                continue
            k = index.get((cid, cause))
            if k is None or kind not in "rma":
                stray += 1
                continue
            slot = "rma".index(kind)
            counts[k][slot] += 1
            for arr in ((first, answer, ended)[slot],):
                arr[k] = arr[k] or t
        answered = sum(1 for k in win if ended[k] is not None)
        r["actions"] = n
        r["warmup_actions"] = warm
        r["answered_live"] = answered
        r["exactly_once_live"] = sum(1 for c in counts if c == [1, 1, 1])
        r["exactly_once_live_of"] = n_all
        r["live_not_matched"] = stray
        ends = [ended[k] for k in win if ended[k] is not None]
        if t_last is None:
            r["error"] = (f"hard cap ({self.args.cap:.0f} s) reached: {answered} of {n} answered "
                          f"(see the worker logs in {self.logdir})")
        t_last = max(ends, default=t_last or time.monotonic())
        window = t_last - t0
        r["window_s"] = round(window, 3)
        r["answered_per_s"] = round(answered / max(window, 1e-9), 1)
        r["answered_per_s_per_worker"] = round(r["answered_per_s"] / self.n, 1)
        r["answered_per_worker_incl_warmup"] = per_worker
        if r.get("settle_s") is not None:  # answered and every work entry acknowledged (waits for claims too)
            r["done_per_s"] = round(answered / max(window + r["settle_s"], 1e-9), 1)
        if self.scenario == "latency":
            r["posting"] = {"s": round(t_posted - t0, 2), "per_s": round(n / max(t_posted - t0, 1e-9), 1)}

        def lat(ks, a, b):
            return dist_ms([a[k] - b(k) for k in ks if a[k] is not None and b(k) is not None])

        ret = lambda k: posts[k][3]  # noqa: E731 - when the post returned
        r["latency_ms"] = {
            "post_return_to_first_event": lat(win, first, ret),
            "post_start_to_first_event": lat(win, first, lambda k: posts[k][2]),
            "post_return_to_answer": lat(win, answer, ret),
            "post_return_to_run_end": lat(win, ended, ret),
            "user_message_heard_to_first_event": lat(win, first, lambda k: heard[k]),
            "post_return_to_user_message_heard": lat(win, heard, ret),
            "post_round_trip": dist_ms([posts[k][3] - posts[k][2] for k in win]),
        }
        # The same over the seconds in which other jobs (not the bench, its workers or Redis) used
        # under NOISY_PCT of a core: the runtime's own tail, where the machine was not shared.
        quiet = {sec for sec, o in self.other_by_second.items() if o < NOISY_PCT}
        qk = [k for k in win if int(posts[k][3] - t0) in quiet]
        r["quiet_seconds"] = {"seconds": len(quiet), "of": len(self.other_by_second), "posts": len(qk),
                              "other_cpu_pct_by_second": self.other_by_second}
        r["latency_ms_quiet_seconds"] = {"post_return_to_first_event": lat(qk, first, ret),
                                         "post_return_to_answer": lat(qk, answer, ret)}
        r["warmup_latency_ms"] = {"post_return_to_first_event": lat(range(warm), first, ret)}
        # p50/p99/max per second of the window (post -> first event), to see when a tail happens
        by_sec: dict[int, list[float]] = {}
        for k in win:
            if first[k] is not None:
                by_sec.setdefault(int(posts[k][3] - t0), []).append(first[k] - posts[k][3])
        r["first_event_ms_by_second"] = {s: {kk: d[kk] for kk in ("n", "p50", "p99", "max")}
                                         for s, d in ((s, dist_ms(v)) for s, v in sorted(by_sec.items()))}
        slow = sorted((k for k in win if first[k] is not None), key=lambda k: first[k] - posts[k][3])[-10:]
        ms = lambda t, k: None if t is None else round((t - posts[k][3]) * 1000, 1)  # noqa: E731
        r["slowest_first_event"] = [{"t_s": round(posts[k][3] - t0, 3), "ms": ms(first[k], k),
                                     "heard_ms": ms(heard[k], k), "conversation": k % len(self.cids)}
                                    for k in slow]
        ours = sum(x or 0 for x in cpu["workers"]) + sum(x or 0 for x in (cpu["redis"][0], cpu["bench"][0],
                                                                          cpu["subscriber"][0]))
        r["cpu_pct"] = {"workers": cpu["workers"], "workers_sum": round(sum(x or 0 for x in cpu["workers"]), 1),
                        "redis": cpu["redis"][0], "bench": cpu["bench"][0], "subscriber": cpu["subscriber"][0],
                        "other": round(cpu["machine_busy_pct"] * cpu["machine_cores"] - ours, 1),
                        "machine_busy_pct_of_all_cores": cpu["machine_busy_pct"],
                        "machine_cores": cpu["machine_cores"], "wall_s": cpu["wall_s"]}
        # CPU per action answered, all of it: until the last work entry was acknowledged (the same
        # commands as redis_commands), and where Redis alone would stop
        full = self.cpu_settled
        secs = full["wall_s"]
        wk_ms = sum(x or 0 for x in full["workers"]) / 100 * secs / max(answered, 1) * 1000
        rd_us = (full["redis"][0] or 0) / 100 * secs / max(answered, 1) * 1e6
        r["cpu_pct_to_settled"] = {"workers": full["workers"], "redis": full["redis"][0], "wall_s": secs}
        r["cpu_per_action"] = {"workers_ms": round(wk_ms, 3), "redis_us": round(rd_us, 1),
                               "redis_bound_actions_per_s": round(1e6 / rd_us) if rd_us else None,
                               "one_core_worker_actions_per_s": round(1000 / wk_ms) if wk_ms else None}
        r["redis_commands"] = runtime_commands(delta(before, after), self.per_post, bench_posts_in_window,
                                               self.inner, n)
        r["redis_commands"]["bench_per_post"] = {k: round(v, 3) for k, v in self.per_post.items()}
        # Time Redis spent executing commands (scripts include what they call; the bench's posts in)
        usec = delta(self.usec0, self.usec1)
        r["redis_commands"]["usec_in_commands_per_action"] = round(
            sum(v for k, v in usec.items() if k in ("evalsha", "eval") or k not in self.inner) / max(n, 1), 1)
        r["redis_commands"]["usec_by_command"] = usec
        r["store_check"] = self._check_store(posts)
        r["store_check"]["of"] = n_all
        sc, fe, c = r["store_check"], r["latency_ms"]["post_return_to_first_event"], r["cpu_pct"]
        say(f"{self.label()}: {answered}/{n} answered in {window:.2f} s = {r['answered_per_s']:,.0f}/s "
            f"({r['answered_per_s_per_worker']:,.0f}/s per worker; answered per worker {per_worker}); post -> first "
            f"event p50 {fe['p50']} p99 {fe['p99']} max {fe['max']} ms; exactly once (warm-up included): store "
            f"{sc['exactly_once']}/{n_all}, live {r['exactly_once_live']}/{n_all}; CPU % workers {c['workers']} "
            f"Redis {c['redis']} bench {c['bench']} + {c['subscriber']} other {c['other']}; Redis cmds/action: "
            f"top-level {r['redis_commands']['top_level_per_action']}, in scripts "
            f"{r['redis_commands']['script_internal_per_action']}; work entries all gone "
            f"{r['settle_s']} s after the last answer")

    def _check_store(self, posts) -> dict:
        """Every message answered exactly once, in order, with its own text (the stored events)."""
        import orjson
        wanted: dict[str, dict[int, str]] = {}
        for cid, eid, _t0, _t1, text in posts:
            wanted.setdefault(cid, {})[eid] = text
        exactly, dup, missing, disorder, wrong, errors = 0, 0, 0, 0, 0, 0
        cids = list(wanted)
        for b in range(0, len(cids), 100):
            pipe = self.ctl.pipeline(transaction=False)
            for cid in cids[b:b + 100]:
                pipe.xrange(f"conv:{{{cid}}}:events", "-", "+")
            for cid, entries in zip(cids[b:b + 100], pipe.execute()):
                seq: dict[int, list[str]] = {}
                order: list[int] = []
                texts: dict[int, str | None] = {}
                for _eid, fields in entries:
                    ev = orjson.loads(fields[b"e"])
                    cause = ev.get("cause")
                    if cause is None:
                        continue
                    if ev["type"] == "error":
                        errors += 1
                    code = STATES.get(ev.get("agent_state"), "s") if ev["type"] == "agent_state_changed" \
                        else KIND.get(ev["type"], "o")
                    seq.setdefault(cause, []).append(code)
                    if code == "m":
                        texts[cause] = ev.get("content")
                    if not order or order[-1] != cause:
                        order.append(cause)
                for eid, text in wanted[cid].items():
                    got = seq.get(eid)
                    if got is None:
                        missing += 1
                    elif got == ["r", "m", "a"]:
                        exactly += 1
                        if texts.get(eid) != text:
                            wrong += 1
                    else:
                        dup += 1
                # runs one at a time, in the order posted: each cause's events together, causes rising
                if order != sorted(order) or len(order) != len(set(order)):
                    disorder += 1
        return {"exactly_once": exactly, "missing": missing, "not_exactly_once": dup,
                "conversations_out_of_order": disorder, "wrong_text": wrong, "error_events": errors}


# ----------------------------------------------------------------------------- report


def f(v, nd=1):
    """A table cell: — for None, thousands without decimals, floats to `nd` places."""
    if v is None:
        return "—"
    if isinstance(v, (int, float)) and abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> str:
    """The main Markdown table, one line per row."""
    out = ["| workers | scenario | actions | answered/s (per worker) | post → first event p50 / p99 / max ms "
           "| post → answer p50 / p99 ms | answered exactly once | CPU % workers | CPU % Redis "
           "| CPU % bench / other | Redis round trips / action (+ commands in scripts) "
           "| work entries all acknowledged, s after the last answer |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "actions" not in r:
            out.append(f"| {r['workers']} | {r['scenario']} | — | failed: {r.get('error', '?').splitlines()[0][:120]} "
                       "| | | | | | | | |")
            continue
        lat = r["latency_ms"]
        fe, an = lat["post_return_to_first_event"], lat["post_return_to_answer"]
        cpu = r["cpu_pct"]
        rc = r["redis_commands"]
        sc = r["store_check"]
        if r["scenario"] == "latency":
            scen = f"latency, {r['posting']['per_s']:.0f}/s offered"
            fe_s = f"{f(fe['p50'], 2)} / {f(fe['p99'], 2)} / {f(fe['max'], 1)}"
            q, qs = r.get("latency_ms_quiet_seconds", {}).get("post_return_to_first_event"), r.get("quiet_seconds")
            if q and q["n"] and qs:
                fe_s += (f" (quiet {qs['seconds']} of {qs['of']} s: {f(q['p50'], 2)} / {f(q['p99'], 2)} / "
                         f"{f(q['max'], 1)})")
            an_s = f"{f(an['p50'], 2)} / {f(an['p99'], 2)}"
        else:
            scen = f"throughput, burst ({r['actions'] / r.get('conversations', 1000):g}/conversation)"
            fe_s = f"(queued: all answered in {r['window_s']:.1f} s)"
            an_s = "—"
        once = f"{sc['exactly_once']:,} / {sc['of']:,}"
        if sc["exactly_once"] != sc["of"] or sc["conversations_out_of_order"] or sc["wrong_text"]:
            once += f" ⚠ (missing {sc['missing']}, not once {sc['not_exactly_once']}, out of order " \
                    f"{sc['conversations_out_of_order']}, wrong text {sc['wrong_text']})"
        workers_cpu = " + ".join(f"{x:.0f}" for x in cpu["workers"] if x is not None)
        rate = f"{f(r['answered_per_s'], 0)} ({f(r['answered_per_s_per_worker'], 0)})"
        if r.get("error"):
            rate += " ⚠ " + r["error"].splitlines()[0][:80]
        mark = " ✱" if noisy(r) else ""
        if r.get("settle_s") is not None:
            settled = f"{r['settle_s']:.1f}"
        else:
            left = sum(v["xlen"] for v in r.get("unsettled", {}).get("shards", {}).values())
            settled = f"⚠ {left} still pending after {r.get('settle_cap', 30):.0f} s"
        errs = r.get("worker_log_errors", {}).get("tracebacks") or {}
        if errs:
            settled += " ⚠ worker errors: " + ", ".join(f"{n}× {k}" for k, n in errs.items())
        out.append(f"| {r['workers']} | {scen} | {r['actions']:,} | {rate} | {fe_s} | {an_s} | {once} "
                   f"| {workers_cpu} | {f(cpu['redis'], 0)} | {f(cpu['bench'] + cpu['subscriber'], 0)} / "
                   f"{f(cpu['other'], 0)}{mark} | {rc['round_trips_per_action_approx']:.2f} "
                   f"(+ {rc['script_internal_per_action']:.1f}) | {settled} |")
    return "\n".join(out)


def noisy(r: dict) -> bool:
    """Other jobs used a notable share of the machine during the row (its numbers are disturbed)."""
    return (r.get("cpu_pct", {}).get("other") or 0) >= NOISY_PCT


def breakdown(rows: list[dict]) -> str:
    """The Redis commands per action of each row, by command and by script (Markdown)."""
    out = ["| workers | scenario | top-level commands / action | EVALSHA by script / action |",
           "|---|---|---|---|"]
    for r in rows:
        if "redis_commands" not in r:
            continue
        rc = r["redis_commands"]
        top = ", ".join(f"{k} {v:.3g}" for k, v in rc["top_level"].items())
        scr = ", ".join(f"{k} {v:.3g}" for k, v in rc["evalsha_by_script_per_action"].items() if v)
        out.append(f"| {r['workers']} | {r['scenario']} | {rc['top_level_per_action']:.2f}: {top} | {scr} |")
    return "\n".join(out)


def targets(rows: list[dict]) -> list[str]:
    """The rows against the targets (latency p99, exactly once, scaling, CPU per action), as bullets."""
    out = []
    for r in rows:
        if r.get("scenario") == "latency" and "latency_ms" in r:
            p99 = r["latency_ms"]["post_return_to_first_event"]["p99"]
            ans = r["latency_ms"]["post_return_to_answer"]["p99"]
            once = r["store_check"]["exactly_once"] == r["store_check"]["of"]
            ok = p99 is not None and p99 < 5 and once
            q = r.get("latency_ms_quiet_seconds", {}).get("post_return_to_first_event") or {}
            qs = r.get("quiet_seconds") or {}
            quiet = (f"; over the {qs.get('seconds')} of {qs.get('of')} s in which other jobs used < {NOISY_PCT:.0f} % "
                     f"of a core: p99 {q.get('p99')} ms ({'met' if (q.get('p99') or 99) < 5 else 'NOT met'})"
                     if q.get("n") else "; no second had the machine to itself")
            out.append(f"- latency, {r['workers']} worker(s), {r['posting']['per_s']:.0f}/s: post → first event "
                       f"p99 {p99} ms (target < 5 ms): {'met' if ok else 'NOT met'}{quiet}; post → answer p99 "
                       f"{ans} ms; every message answered exactly once: {'yes' if once else 'NO'}")
    thr = {r["workers"]: r for r in rows if r.get("scenario") == "throughput" and "answered_per_s" in r}
    if 1 in thr and len(thr) > 1:
        base = thr[1]["answered_per_s"]
        for n, r in sorted(thr.items()):
            if n == 1:
                continue
            cpu = r["cpu_pct"]
            out.append(f"- throughput, {n} workers: {r['answered_per_s']:,.0f}/s = {r['answered_per_s'] / base:.2f}× "
                       f"1 worker (linear: {n}×); Redis {cpu['redis']}% of a core, the machine "
                       f"{cpu['machine_busy_pct_of_all_cores']}% busy over its {cpu['machine_cores']} cores")
        for n, r in sorted(thr.items()):
            c = r["cpu_per_action"]
            if c["redis_bound_actions_per_s"] and c["one_core_worker_actions_per_s"]:
                out.append(f"- CPU per action, {n} worker(s): workers {c['workers_ms']} ms, Redis {c['redis_us']} µs: "
                           f"a worker with a core of its own answers ~{c['one_core_worker_actions_per_s']:,}/s; Redis "
                           f"(one core) would be the limit at ~{c['redis_bound_actions_per_s']:,}/s, i.e. "
                           f"~{c['redis_bound_actions_per_s'] / c['one_core_worker_actions_per_s']:.1f} such workers")
    return out
