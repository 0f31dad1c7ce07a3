#!/usr/bin/env python3
"""The limits of `fewstep serve` under load, against a server this script starts itself
(on loopback, bounded in time, stopping by itself):

  overload  open-loop load at 2x the measured capacity for 60 s: every accepted request
            answered, every reject a 429 whose Retry-After is within 2x of the real drain
            time (queued jobs / measured throughput), RSS sampled;
  soak      open-loop load at 80% of capacity for 10 minutes, RSS and p99 sampled every
            10 s and plotted to a PNG (matplotlib; install it into a virtualenv);
  sigterm   open-loop load at capacity, SIGTERM after 5 s: requests sent before the signal
            are answered (200, or 503 `draining` at the drain deadline), never cut.
  slowclients  closed-loop requests with and without 200 idle connections held open, in
            alternating rounds: p99 unchanged within noise, the idle ones closed by the
            server at its header timeout.

    python3 load-tests/limits.py --binary target/release/fewstep overload
    python3 load-tests/limits.py --binary target/release/fewstep soak --png load-tests/soak.png

Prints one JSON object of results; exits non-zero when a target is missed.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

BODY = {"prompt": "a yellow triangle at the top", "steps": 4, "guidance": 1.0}
ADMIN = "load-admin"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round((len(values) - 1) * p))]


class Server:
    def __init__(self, binary, queue_capacity, shutdown_timeout_s):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.work = tempfile.mkdtemp(prefix="fewstep-limits-")
        env = dict(os.environ)
        env.update(
            FEWSTEP_STORE_URL=f"sqlite://{self.work}/log.db",
            FEWSTEP_ADMIN_TOKEN=ADMIN,
            FEWSTEP_QUEUE_CAPACITY=str(queue_capacity),
            FEWSTEP_SHUTDOWN_TIMEOUT_S=str(shutdown_timeout_s),
        )
        self.log = open(os.path.join(self.work, "server.log"), "wb")
        self.proc = subprocess.Popen(
            [binary, "serve", "--addr", f"127.0.0.1:{self.port}", "--models", "tiny-shapes"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        for _ in range(240):
            try:
                urllib.request.urlopen(self.url + "/ready", timeout=1).read()
                return
            except Exception:
                time.sleep(0.5)
        raise SystemExit(f"server did not become ready; see {self.work}/server.log")

    def queued(self):
        req = urllib.request.Request(self.url + "/admin/queue")
        req.add_header("authorization", f"Bearer {ADMIN}")
        return json.load(urllib.request.urlopen(req, timeout=5))["queued_jobs"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def one_request(url, timeout=120):
    """(status, latency_s, retry_after or None, error string or None)."""
    data = json.dumps(BODY).encode()
    req = urllib.request.Request(url + "/generate", data=data, method="POST")
    req.add_header("content-type", "application/json")
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status, time.monotonic() - t0, None, None
    except urllib.error.HTTPError as e:
        body = e.read()
        code = None
        try:
            code = json.loads(body).get("code")
        except Exception:
            pass
        ra = e.headers.get("retry-after")
        return e.code, time.monotonic() - t0, int(ra) if ra else None, code
    except Exception as e:  # a cut connection, a timeout
        return None, time.monotonic() - t0, None, type(e).__name__


def count_statuses(results):
    counts = {}
    for r in results:
        counts[str(r[1])] = counts.get(str(r[1]), 0) + 1
    return counts


def capacity(server, seconds=15, concurrency=8):
    """Completed requests per second, closed loop, at `concurrency`."""
    done = [0]
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def worker():
        while time.monotonic() < end:
            status, _, _, _ = one_request(server.url)
            if status == 200:
                with lock:
                    done[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / seconds


def open_loop(server, rate, seconds, on_tick=None, stop_at=None):
    """Sends `rate` requests/s for `seconds`, each on its own thread. Returns the results
    as (sent_at, status, latency, retry_after, code, queued_at_send, rate_at_send)."""
    results = []
    lock = threading.Lock()
    threads = []
    start = time.monotonic()
    n = 0
    next_tick = start + 10
    while True:
        now = time.monotonic()
        if now - start >= seconds:
            break
        if stop_at is not None and now - start >= stop_at[0] and not stop_at[1]:
            stop_at[1] = True
            stop_at[2] = now - start
            server.proc.send_signal(signal.SIGTERM)
        if on_tick and now >= next_tick:
            on_tick(now - start, results)
            next_tick += 10
        target = start + n / rate
        if now < target:
            time.sleep(min(target - now, 0.05))
            continue
        n += 1
        sent_at = now - start

        def run(sent_at=sent_at):
            r = one_request(server.url)
            with lock:
                results.append((sent_at,) + r)

        t = threading.Thread(target=run)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return results


def overload(args):
    server = Server(args.binary, args.queue_capacity, 30)
    try:
        cap = capacity(server)
        rss = [rss_mb(server.proc.pid)]
        # Real drain time at each reject: the queue's depth then, over the capacity.
        drain_samples = []

        def sampler(stop):
            while not stop.is_set():
                try:
                    drain_samples.append((time.monotonic(), server.queued() / cap))
                except Exception:
                    pass
                rss.append(rss_mb(server.proc.pid))
                stop.wait(1.0)

        stop = threading.Event()
        t = threading.Thread(target=sampler, args=(stop,))
        t.start()
        results = open_loop(server, 2 * cap, args.seconds)
        stop.set()
        t.join()
        statuses = count_statuses(results)
        rejects = [r for r in results if r[1] == 429]
        drain = sorted(d for _, d in drain_samples)
        real = max(1.0, percentile(drain, 0.5))
        truthful = [r for r in rejects if r[3] is not None and real / 2 <= r[3] <= 2 * real]
        lost = [r for r in results if r[1] not in (200, 429)]
        out = {
            "scenario": "overload",
            "capacity_rps": round(cap, 2),
            "offered_rps": round(2 * cap, 2),
            "seconds": args.seconds,
            "sent": len(results),
            "statuses": statuses,
            "accepted_lost": len(lost),
            "rejects": len(rejects),
            "rejects_with_retry_after": sum(1 for r in rejects if r[3] is not None),
            "median_real_drain_s": round(real, 2),
            "retry_after_values": sorted({r[3] for r in rejects if r[3] is not None}),
            "retry_after_within_2x": len(truthful),
            "p99_ok_s": round(percentile([r[2] for r in results if r[1] == 200], 0.99), 3),
            "rss_mb_first_last_max": [round(rss[0]), round(rss[-1]), round(max(rss))],
        }
        ok = not lost and len(truthful) == len(rejects)
        return out, ok
    finally:
        server.stop()


def rss_trend(samples):
    """Growth of RSS over `samples` ((t, rss, ...) tuples) as the least-squares line's rise
    across their span, relative to their mean. The server returns freed pages, so RSS moves
    around its working set by several MB between samples; the peak against one sample
    measures that movement, the line measures growth."""
    if len(samples) < 2:
        return float("nan")
    n = len(samples)
    mt = sum(s[0] for s in samples) / n
    mr = sum(s[1] for s in samples) / n
    var = sum((s[0] - mt) ** 2 for s in samples)
    slope = sum((s[0] - mt) * (s[1] - mr) for s in samples) / var
    return slope * (samples[-1][0] - samples[0][0]) / mr


def soak(args):
    server = Server(args.binary, args.queue_capacity, 30)
    try:
        cap = capacity(server)
        samples = []  # (t, rss_mb, p99 of the last 10 s)

        def tick(t, results):
            recent = [r[2] for r in list(results) if r[1] == 200 and r[0] >= t - 10]
            samples.append((round(t), rss_mb(server.proc.pid), percentile(recent, 0.99)))

        results = open_loop(server, 0.8 * cap, args.seconds, on_tick=tick)
        statuses = count_statuses(results)
        after_first_minute = [s for s in samples if s[0] >= 60]
        base = after_first_minute[0][1] if after_first_minute else float("nan")
        peak = (max(s[1] for s in after_first_minute) - base) / base if after_first_minute else float("nan")
        growth = rss_trend(after_first_minute)
        if args.png:
            plot(samples, args.png)
        out = {
            "scenario": "soak",
            "capacity_rps": round(cap, 2),
            "offered_rps": round(0.8 * cap, 2),
            "seconds": args.seconds,
            "sent": len(results),
            "statuses": statuses,
            "rss_growth_after_first_minute": round(growth, 4),
            "rss_peak_over_minute_one": round(peak, 4),
            "samples": [(t, round(r, 1), round(p, 3)) for t, r, p in samples],
        }
        return out, growth < 0.05 and set(statuses) == {"200"}
    finally:
        server.stop()


def plot(samples, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] for s in samples]
    fig, ax1 = plt.subplots(figsize=(8, 4))
    ax1.plot(t, [s[1] for s in samples], color="tab:blue", label="RSS (MB)")
    ax1.set_xlabel("seconds")
    ax1.set_ylabel("RSS (MB)", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(t, [s[2] for s in samples], color="tab:red", label="p99 (s)")
    ax2.set_ylabel("p99 latency over the last 10 s (s)", color="tab:red")
    fig.suptitle("fewstep soak at 80% of capacity")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def sigterm(args):
    server = Server(args.binary, args.queue_capacity, 10)
    cap = capacity(server, seconds=10)
    stop_at = [5.0, False, None]
    results = open_loop(server, cap, 10, stop_at=stop_at)
    code = server.stop()
    before = [r for r in results if r[0] < stop_at[2]]
    answered = [r for r in before if r[1] in (200, 429) or (r[1] == 503 and r[4] == "draining")]
    cut = [r for r in before if r[1] is None]
    out = {
        "scenario": "sigterm",
        "capacity_rps": round(cap, 2),
        "sent_before_signal": len(before),
        "answered_before_signal": len(answered),
        "cut_before_signal": len(cut),
        "statuses_before": {str(s): sum(1 for r in before if r[1] == s) for s in {r[1] for r in before}},
        "after_signal": {str(s): sum(1 for r in results if r[0] >= stop_at[2] and r[1] == s) for s in {r[1] for r in results}},
        "exit_code": code,
    }
    return out, not cut and len(answered) == len(before) and code == 0


def slowclients(args):
    """p99 of closed-loop requests with and without 200 idle connections held open (each one
    re-opened as soon as the server closes it at its header timeout), in alternating rounds
    of `args.seconds / 6` seconds; the idle connections must be closed by the server."""
    server = Server(args.binary, args.queue_capacity, 30)
    idle, closed = [], [0]
    stop = threading.Event()

    def hold():
        # Keep 200 idle connections open; count those the server closes.
        while not stop.is_set():
            while len(idle) < 200:
                idle.append(socket.create_connection(("127.0.0.1", server.port)))
            for c in list(idle):
                c.setblocking(False)
                try:
                    if c.recv(1) == b"":
                        idle.remove(c)
                        c.close()
                        closed[0] += 1
                except BlockingIOError:
                    pass
            time.sleep(0.2)

    def round_p99(seconds):
        lat, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            status, t, _, _ = one_request(server.url)
            if status == 200:
                lat.append(t)
        return percentile(sorted(lat), 0.99), len(lat)

    try:
        per_round = max(args.seconds // 6, 5)
        round_p99(per_round)  # warm-up
        quiet, loaded = [], []
        holder = None
        for _ in range(3):
            quiet.append(round_p99(per_round))
            stop.clear()
            holder = threading.Thread(target=hold, daemon=True)
            holder.start()
            time.sleep(1)
            loaded.append(round_p99(per_round))
            stop.set()
            holder.join()
            for c in idle:
                c.close()
            idle.clear()
        q = sorted(x[0] for x in quiet)[1]
        l = sorted(x[0] for x in loaded)[1]
        out = {
            "scenario": "slowclients",
            "round_seconds": per_round,
            "p99_s_without_idle": [round(x[0], 4) for x in quiet],
            "p99_s_with_200_idle": [round(x[0], 4) for x in loaded],
            "requests_per_round": [x[1] for x in quiet + loaded],
            "median_p99_ratio_with_over_without": round(l / q, 3),
            "idle_connections_closed_by_server": closed[0],
        }
        # "Unchanged within noise": the medians within the rounds' own spread, or 20%.
        spread = max(x[0] for x in quiet) / min(x[0] for x in quiet)
        return out, l / q <= max(1.2, spread) and closed[0] >= 200
    finally:
        stop.set()
        server.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--binary", required=True)
    p.add_argument("--queue-capacity", type=int, default=32)
    p.add_argument("--seconds", type=int, default=None)
    p.add_argument("--png", default=None)
    p.add_argument("scenario", choices=["overload", "soak", "sigterm", "slowclients"])
    args = p.parse_args()
    if args.seconds is None:
        args.seconds = {"overload": 60, "soak": 600, "sigterm": 10, "slowclients": 120}[
            args.scenario
        ]
    args.seconds = min(args.seconds, 900)
    scenarios = {"overload": overload, "soak": soak, "sigterm": sigterm, "slowclients": slowclients}
    out, ok = scenarios[args.scenario](args)
    out["ok"] = ok
    print(json.dumps(out, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
