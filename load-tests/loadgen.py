#!/usr/bin/env python3
"""Closed-loop HTTP load generator for `fewstep serve` (standard library only).

Each of `concurrency` workers sends requests back to back until `requests` have been sent
in all or `max_seconds` have passed. Targets must be loopback addresses: the script refuses
anything else. Prints throughput, latency percentiles, status counts and the batch sizes the
server reported, as a table and (with --json) as JSON.

    python3 load-tests/loadgen.py --url http://127.0.0.1:8080 --scenario load-tests/scenarios/images.json
"""

import argparse
import ipaddress
import json
import random
import socket
import statistics
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request


def loopback_only(url):
    host = urllib.parse.urlparse(url).hostname or ""
    addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not addrs or not all(ipaddress.ip_address(a).is_loopback for a in addrs):
        sys.exit(f"refusing to load {host}: only loopback targets are allowed")


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round((len(values) - 1) * p))]


def run_level(url, scenario, concurrency, requests, max_seconds, api_key, seed):
    bodies = scenario["requests"]
    weights = [b.get("weight", 1.0) for b in bodies]
    lock = threading.Lock()
    sent = [0]
    results = []  # (latency_ms, status, batch_size)
    start = time.monotonic()

    def worker(idx):
        rng = random.Random(seed * 1000 + idx)
        while True:
            with lock:
                if sent[0] >= requests or time.monotonic() - start >= max_seconds:
                    return
                sent[0] += 1
            body = dict(rng.choices(bodies, weights)[0]["body"])
            body.setdefault("seed", rng.randrange(1 << 53))
            data = json.dumps(body).encode()
            req = urllib.request.Request(url + "/generate", data=data, method="POST")
            req.add_header("content-type", "application/json")
            if api_key:
                req.add_header("authorization", f"Bearer {api_key}")
            t = time.monotonic()
            try:
                with urllib.request.urlopen(req, timeout=max_seconds + 30) as res:
                    payload = json.loads(res.read())
                    status, batch = res.status, payload.get("batch_size", 0)
            except urllib.error.HTTPError as e:
                status, batch = e.code, 0
            except (urllib.error.URLError, OSError):
                status, batch = 0, 0
            with lock:
                results.append(((time.monotonic() - t) * 1e3, status, batch))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.monotonic() - start
    ok = [r for r in results if r[1] == 200]
    statuses = {}
    for r in results:
        statuses[r[1]] = statuses.get(r[1], 0) + 1
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "statuses": statuses,
        "ok_per_s": len(ok) / elapsed if elapsed else 0.0,
        "p50_ms": percentile([r[0] for r in ok], 0.5),
        "p99_ms": percentile([r[0] for r in ok], 0.99),
        "mean_batch": statistics.fmean([r[2] for r in ok]) if ok else 0.0,
        "seconds": elapsed,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--scenario", required=True, help="JSON file: {levels, requests_per_level, max_seconds, requests: [{weight, body}]}")
    ap.add_argument("--api-key")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args()
    loopback_only(args.url)
    with open(args.scenario) as f:
        scenario = json.load(f)
    levels = scenario.get("levels", [1, 8, 32])
    per_level = min(int(scenario.get("requests_per_level", 128)), 10_000)
    max_seconds = min(float(scenario.get("max_seconds", 60)), 600)
    rows = [run_level(args.url, scenario, c, per_level, max_seconds, args.api_key, args.seed) for c in levels]
    print(f"{'conc':>5} {'reqs':>6} {'ok':>6} {'ok/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6}  statuses")
    for r in rows:
        print(f"{r['concurrency']:>5} {r['requests']:>6} {r['ok']:>6} {r['ok_per_s']:>8.1f} {r['p50_ms']:>8.0f} "
              f"{r['p99_ms']:>8.0f} {r['mean_batch']:>6.1f}  {r['statuses']}")
    if args.json:
        print(json.dumps(rows, indent=2))
    if any(r["ok"] == 0 for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
