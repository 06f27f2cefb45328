#!/usr/bin/env python3
"""Summarise one tsung/run.sh run: Tsung's own counters plus herald's /metrics, and check them.

usage: summary.py TSUNG_LOG METRICS_JSON --scenario seed|connect_hold|push|other
                  --users N [--pings N] [--events N] [--ips N] [--rate N] [--hold-covers-ramp]

TSUNG_LOG is the text-backend tsung.log. Tsung writes a block every 10 s; each counter line is
"stats: <name> <this interval> <total so far>", each sample line is
"stats: <name> <n> <mean> <stddev> <max> <min> <mean before> <n before>" (ms, the "before" pair
excludes this interval), and "stats: users <now> <max>". The last block holds the totals.

METRICS_JSON is written by run.sh's poller: {"peak_connections": N, "first_connection_s": T,
"peak_reached_s": T, "client_addresses_at_peak": {address: connections}, "last": {metric: value}},
the values summed over shards, the times in seconds since the poller started (1 s resolution).

seed (tsung/seed.xml) passes only if every one of the N users connected: Tsung's connect count,
its WebSocket upgrades and its finished sessions are N, herald's peak of open connections and its
accepted connections are N, nothing was rejected, no error, every ping got its pong, and the
connections came from all the client addresses.

Prints one "key: value" line per figure, then PASS or FAIL lines; exits 1 on any FAIL.
"""
import argparse
import json
import sys


def read_tsung(path):
    counters, samples, users_max = {}, {}, 0
    with open(path) as f:
        for line in f:
            if not line.startswith("stats: "):
                continue
            parts = line.split()
            name, vals = parts[1], parts[2:]
            if name.startswith("{"):  # {cpu,...} {load,...} {freemem,...}: controller health
                continue
            if name == "users":
                users_max = max(users_max, int(float(vals[1])))
            elif len(vals) == 2:
                counters[name] = int(float(vals[1]))
            elif len(vals) >= 7:
                n, mean, mx = int(float(vals[0])), float(vals[1]), float(vals[3])
                mean0, n0 = float(vals[5]), int(float(vals[6]))
                total = n + n0
                prev = samples.get(name, {"max_ms": 0.0})
                samples[name] = {
                    "count": total,
                    "mean_ms": round((n * mean + n0 * mean0) / total, 3) if total else 0.0,
                    "max_ms": max(mx, prev["max_ms"]),
                }
    return counters, samples, users_max


def address_key(addr):
    parts = addr.split(".")
    return [int(p) for p in parts] if all(p.isdigit() for p in parts) else [1 << 16, addr]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tsung_log")
    ap.add_argument("metrics_json")
    ap.add_argument("--scenario", required=True)
    ap.add_argument("--users", type=int, required=True)
    ap.add_argument("--pings", type=int, default=0)
    ap.add_argument("--events", type=int, default=0)
    ap.add_argument("--ips", type=int, default=0, help="seed: client addresses used")
    ap.add_argument("--rate", type=float, default=0, help="arrivals per second asked for")
    ap.add_argument("--hold-covers-ramp", action="store_true",
                    help="every user is still connected when the last one arrives")
    a = ap.parse_args()

    c, s, users_max = read_tsung(a.tsung_log)
    with open(a.metrics_json) as f:
        m = json.load(f)
    last = m.get("last", {})
    peak = m.get("peak_connections", 0)

    ws_ok = c.get("websocket_succ", 0)
    errors = {k: v for k, v in sorted(c.items()) if k.startswith("error") and v}
    connect = s.get("connect", {})
    session = s.get("session", {})
    rejected = last.get("herald_handshake_rejected_total", 0)
    first_at, peak_at = m.get("first_connection_s"), m.get("peak_reached_s")
    per_addr = m.get("client_addresses_at_peak")  # {address: connections}, None without ss
    addrs = len(per_addr) if isinstance(per_addr, dict) else per_addr

    print(f"tsung users started / finished:   {c.get('users_count', 0)} / {c.get('finish_users_count', 0)}")
    print(f"tsung users (max concurrent):     {users_max}")
    print(f"tsung connects:                   {connect.get('count', 0)}")
    print(f"tsung websocket_succ / fail:      {ws_ok} / {c.get('websocket_fail', 0)}")
    print(f"tsung connect time mean / max:    {connect.get('mean_ms', 0)} ms / {connect.get('max_ms', 0)} ms")
    print(f"tsung sessions / mean length:     {session.get('count', 0)} / {round(session.get('mean_ms', 0) / 1000, 1)} s")
    print(f"tsung match / nomatch:            {c.get('match', 0)} / {c.get('nomatch', 0)}")
    print(f"tsung requests without ack:       {c.get('request_noack', 0)}")
    print(f"tsung bytes received / sent:      {c.get('size_rcv', 0)} / {c.get('size_sent', 0)}")
    print(f"tsung async reads (pushed data):  {c.get('async_unknown_data_rcv', 0)}")
    print(f"tsung errors:                     {errors or 'none'}")
    print(f"herald peak connections:          {peak}")
    if first_at is not None and peak_at is not None:
        span = peak_at - first_at
        rate = f", about {round(peak / span)}/s" if span > 0 else ""
        asked = f" (asked for {a.rate:g}/s)" if a.rate else ""
        print(f"herald peak reached after:        {span:.0f} s from the first connection{rate}{asked}")
    if isinstance(per_addr, dict) and per_addr:
        names = sorted(per_addr, key=address_key)
        shown = " ".join(names) if len(names) <= 12 else f"{names[0]} ... {names[-1]}"
        print(f"herald client addresses at peak:  {addrs} ({shown}), "
              f"{min(per_addr.values())} to {max(per_addr.values())} connections each")
    else:
        print(f"herald client addresses at peak:  {addrs if addrs is not None else 'n/a (no ss)'}")
    print(f"herald connections accepted:      {last.get('herald_connections_accepted_total', 0)}")
    print(f"herald handshakes rejected:       {rejected}")
    print(f"herald open-file limit:           {last.get('herald_fd_limit', 'n/a')}")
    print(f"herald events published:          {last.get('herald_events_published_total', 0)}")
    print(f"herald event frames delivered:    {last.get('herald_event_frames_total', 0)}")
    print(f"herald slow consumers / idle closed / protocol errors / rate limited / accept errors: "
          f"{last.get('herald_slow_consumers_total', 0)} / {last.get('herald_idle_closed_total', 0)} / "
          f"{last.get('herald_protocol_errors_total', 0)} / "
          f"{last.get('herald_rate_limited_messages_total', 0)} / "
          f"{last.get('herald_accept_errors_total', 0)}")

    fails = []

    def check(ok, what):
        print(("PASS " if ok else "FAIL ") + what)
        if not ok:
            fails.append(what)

    check(ws_ok == a.users, f"all {a.users} users completed the WebSocket upgrade (got {ws_ok})")
    check(not errors, "Tsung counted no errors")
    if a.hold_covers_ramp and a.scenario != "seed":  # seed checks peak == users below
        check(peak >= a.users, f"herald held all {a.users} connections at once (peak {peak})")
    for k in ("herald_slow_consumers_total", "herald_idle_closed_total",
              "herald_protocol_errors_total", "herald_rate_limited_messages_total",
              "herald_accept_errors_total"):
        check(last.get(k, 0) == 0, f"{k} is 0")
    if a.scenario == "seed":
        n = a.users
        check(connect.get("count", 0) == n, f"Tsung connected all {n} users ({connect.get('count', 0)} connects)")
        check(session.get("count", 0) == n, f"all {n} sessions ran to their end ({session.get('count', 0)})")
        check(peak == n, f"herald held all {n} connections at once (peak {peak})")
        accepted = last.get("herald_connections_accepted_total", 0)
        check(accepted == n, f"herald accepted {n} connections ({accepted})")
        check(rejected == 0, f"herald rejected no handshake ({rejected})")
        if isinstance(per_addr, dict) and a.ips:
            # run.sh's client addresses: 127.0.0.2 upwards (anything else connected is not Tsung's)
            want = [f"127.0.0.{2 + i}" for i in range(min(a.ips, n))]
            got = sum(per_addr.get(x, 0) for x in want)
            check(all(per_addr.get(x) for x in want) and got == n,
                  f"the {n} connections came from all {len(want)} client addresses "
                  f"({want[0]} to {want[-1]}: {got} connections from {sum(1 for x in want if per_addr.get(x))} of them)")
    if a.scenario in ("connect_hold", "seed"):
        want = a.users * a.pings
        check(c.get("match", 0) == want and c.get("nomatch", 0) == 0,
              f"every ping got its pong ({want} expected, {c.get('match', 0)} matched)")
    if a.scenario == "push":
        check(c.get("match", 0) == a.events and c.get("nomatch", 0) == 0,
              f"all {a.events} publishes answered with an id ({c.get('match', 0)})")
        frames, want = last.get("herald_event_frames_total", 0), a.events * ws_ok
        check(frames == want,
              f"every subscriber got every event: {frames} frames = {a.events} events x {ws_ok} subscribers")
    print("RESULT: " + ("OK" if not fails else f"FAILED ({len(fails)} checks)"))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
