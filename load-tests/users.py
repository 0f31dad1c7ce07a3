#!/usr/bin/env python3
"""Simulated users of a running `fewstep serve` (loopback only, bounded, stdlib only).

Users ask for ShapesWorld prompts from a distribution that differs from the training grammar
(weighted toward held-out compositions), and rate every output with the world verifier's
score plus noise through POST /feedback. The server logs both; `fewstep distill --from-log`
then trains on them. Prints the users' mean verifier score (the number a refinement round
should raise), per split.

    python3 load-tests/users.py --url http://127.0.0.1:8080 --users 200
"""

import argparse
import base64
import json
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse


def loopback_only(url):
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"refusing to load {host}: load tests only target loopback")


def post(url, body, api_key=None, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("content-type", "application/json")
    if api_key:
        req.add_header("authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def prompts(fewstep, split, n, seed, video=False):
    cmd = [fewstep, "prompts", "--split", split, "--n", str(n), "--seed", str(seed)]
    if video:
        cmd.append("--video")
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--fewstep", default="target/release/fewstep", help="the fewstep binary (for prompts and verify)")
    ap.add_argument("--users", type=int, default=100, help="requests to send (at most 5000)")
    ap.add_argument("--held-out-share", type=float, default=0.7, help="share of prompts from held-out compositions")
    ap.add_argument("--video-share", type=float, default=0.0, help="share of video prompts")
    ap.add_argument("--noise", type=float, default=0.1, help="std of the noise added to the verifier score")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=600)
    ap.add_argument("--no-feedback", action="store_true", help="only measure, do not rate")
    ap.add_argument("--seed", type=int, default=0, help="prompt distribution and noise seed")
    ap.add_argument("--api-key")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON too")
    args = ap.parse_args()
    loopback_only(args.url)
    n = max(1, min(args.users, 5000))
    rng = random.Random(args.seed)

    # The user distribution: a fixed pool per split (users repeat themselves), mixed by share.
    pool = {
        "held-out": prompts(args.fewstep, "held-out", 64, args.seed),
        "train": prompts(args.fewstep, "train", 64, args.seed),
    }
    if args.video_share > 0:
        pool["held-out-video"] = prompts(args.fewstep, "held-out", 16, args.seed, video=True)
        pool["train-video"] = prompts(args.fewstep, "train", 16, args.seed, video=True)
    asks = []
    for i in range(n):
        split = "held-out" if rng.random() < args.held_out_share else "train"
        video = args.video_share > 0 and rng.random() < args.video_share
        key = split + ("-video" if video else "")
        asks.append((key, rng.choice(pool[key]), 1000 + i))

    deadline = time.time() + min(args.max_seconds, 3600)

    def ask(a):
        key, prompt, seed = a
        if time.time() > deadline:
            return None
        body = {"prompt": prompt, "seed": seed}
        if key.endswith("video"):
            body["num_frames"] = 8
        try:
            r = post(f"{args.url}/generate", body, args.api_key)
            o = r["outputs"][0]
            return {"split": key, "prompt": prompt, "id": r["id"], "version": r["model_version"],
                    "media_type": o["media_type"], "data": o["data"]}
        except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
            return {"split": key, "prompt": prompt, "error": str(e)}

    with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as ex:
        done = [r for r in ex.map(ask, asks) if r is not None]
    ok = [r for r in done if "error" not in r]
    if not ok:
        sys.exit("no request succeeded")

    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for r in ok:
            f.write(json.dumps({"prompt": r["prompt"], "media_type": r["media_type"], "data": r["data"]}) + "\n")
        path = f.name
    out = subprocess.run([args.fewstep, "verify", "--jsonl", path], check=True, capture_output=True, text=True)
    for r, line in zip(ok, out.stdout.splitlines()):
        v = json.loads(line)
        r["score"], r["pass"] = v.get("score", 0.0), v.get("pass", False)

    rated = 0
    if not args.no_feedback:
        for r in ok:
            score = min(1.0, max(0.0, r["score"] + rng.gauss(0.0, args.noise)))
            try:
                post(f"{args.url}/feedback", {"generation_id": r["id"], "score": round(score, 4)}, args.api_key)
                rated += 1
            except Exception as e:  # noqa: BLE001
                print(f"feedback failed: {e}", file=sys.stderr)

    summary = {"requests": len(done), "succeeded": len(ok), "rated": rated,
               "versions": sorted({r["version"] for r in ok}), "by_split": {}}
    for key in sorted({r["split"] for r in ok}):
        rows = [r for r in ok if r["split"] == key]
        summary["by_split"][key] = {
            "n": len(rows),
            "mean_verifier_score": round(sum(r["score"] for r in rows) / len(rows), 4),
            "pass_rate": round(sum(r["pass"] for r in rows) / len(rows), 4),
        }
    summary["mean_verifier_score"] = round(sum(r["score"] for r in ok) / len(ok), 4)
    # During a canary rollout both versions answer: each one's share and score.
    summary["by_version"] = {}
    for version in summary["versions"]:
        rows = [r for r in ok if r["version"] == version]
        summary["by_version"][version] = {
            "n": len(rows),
            "mean_verifier_score": round(sum(r["score"] for r in rows) / len(rows), 4),
            "pass_rate": round(sum(r["pass"] for r in rows) / len(rows), 4),
        }
    print(f"{len(ok)}/{len(done)} requests ok, {rated} rated, model versions {summary['versions']}")
    print(f"{'split':<16}{'n':>6}{'mean score':>12}{'pass':>8}")
    for key, row in summary["by_split"].items():
        print(f"{key:<16}{row['n']:>6}{row['mean_verifier_score']:>12.3f}{row['pass_rate']:>8.1%}")
    print(f"{'all':<16}{len(ok):>6}{summary['mean_verifier_score']:>12.3f}")
    if len(summary["by_version"]) > 1:
        for version, row in summary["by_version"].items():
            print(f"{version:<16}{row['n']:>6}{row['mean_verifier_score']:>12.3f}{row['pass_rate']:>8.1%}")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
