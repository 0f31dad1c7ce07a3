#!/usr/bin/env python3
"""Drives a real fewstep server with clients it did not write: the official `openai` package
(unchanged, only `base_url` set) and a client that `openapi-python-client` generates from the
committed `openapi/openapi.json`. Exits non-zero on the first mismatch.

Usage: check_clients.py PATH/TO/fewstep   (run from the repository root; see .ci/run)
"""

import base64
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def png_size(data):
    """Width and height of a PNG (from its IHDR), failing on anything else."""
    check(data[:8] == b"\x89PNG\r\n\x1a\n", f"not a PNG: {data[:8]!r}")
    return struct.unpack(">II", data[16:24])


def mp4_samples(data):
    """The sample (frame) count of the first track, from its `stsz` box."""
    check(data[4:8] == b"ftyp", f"not an MP4: {data[:8]!r}")
    i = data.find(b"stsz")
    check(i > 0, "no stsz box")
    return struct.unpack(">I", data[i + 12 : i + 16])[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(binary, workdir, models="tiny-shapes", env_extra=None):
    """`binary serve` on a free loopback port, logging to a SQLite file in `workdir`; returns
    the process and its base URL once it is ready."""
    port = free_port()
    env = dict(os.environ)
    env["FEWSTEP_STORE_URL"] = f"sqlite://{workdir}/log.db"
    env.update(env_extra or {})
    log = open(os.path.join(workdir, "server.log"), "wb")
    proc = subprocess.Popen(
        [binary, "serve", "--addr", f"127.0.0.1:{port}", "--models", models],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"{base}/ready", timeout=1) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server never became ready")


@contextlib.contextmanager
def serving(binary, **kwargs):
    """`start_server` for the `with` block (yielding the base URL and the work directory); on a
    failure the tail of the server's log goes to stderr. Also used by tests/browser/."""
    with tempfile.TemporaryDirectory() as workdir:
        proc, base = start_server(os.path.abspath(binary), workdir, **kwargs)
        try:
            yield base, workdir
        except Exception:
            with open(os.path.join(workdir, "server.log"), "rb") as f:
                sys.stderr.write(f.read()[-4000:].decode(errors="replace"))
            raise
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def openai_client(base):
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)

    r = client.images.generate(
        model="tiny-shapes", prompt="a red circle", n=2, size="32x32", response_format="b64_json"
    )
    check(len(r.data) == 2, f"n=2 gave {len(r.data)} images")
    for img in r.data:
        check(png_size(base64.b64decode(img.b64_json)) == (32, 32), "image size")
    check(r.data[0].b64_json != r.data[1].b64_json, "the two images are the same")
    check(r.size == "32x32" and r.output_format == "png", f"{r.size} {r.output_format}")

    events = list(
        client.images.generate(
            model="tiny-shapes", prompt="a blue square", stream=True, partial_images=2
        )
    )
    types = [e.type for e in events]
    check(
        types[-1] == "image_generation.completed"
        and types[:-1] == ["image_generation.partial_image"] * (len(types) - 1)
        and len(types) >= 2,
        f"stream events {types}",
    )
    for e in events:
        check(png_size(base64.b64decode(e.b64_json)) == (32, 32), "streamed image size")
    check(
        [e.partial_image_index for e in events[:-1]] == list(range(len(events) - 1)),
        "partial image indices",
    )

    ids = [m.id for m in client.models.list()]
    check("tiny-shapes" in ids, f"models.list: {ids}")
    check(client.models.retrieve("tiny-shapes").owned_by == "fewstep", "models.retrieve")

    try:
        client.images.generate(prompt="a red circle", response_format="url")
        raise AssertionError("response_format=url was accepted")
    except openai.BadRequestError as e:
        check(e.body["param"] == "response_format", f"error body {e.body}")

    v = client.videos.create(
        model="tiny-shapes", prompt="a red circle moving right", seconds="1", size="32x32"
    )
    last = -1
    while v.status in ("queued", "in_progress"):
        check(isinstance(v.progress, int) and v.progress >= last, f"progress {v.progress}")
        last = v.progress
        time.sleep(0.05)
        v = client.videos.retrieve(v.id)
    check(v.status == "completed" and v.progress == 100, f"video ended {v.status} {v.progress}")
    mp4 = client.videos.download_content(v.id, variant="video").read()
    check(mp4_samples(mp4) == 8, "1 second at 8 fps is 8 frames")
    thumb = client.videos.download_content(v.id, variant="thumbnail").read()
    check(png_size(thumb) == (32, 32), "thumbnail")
    check(any(x.id == v.id for x in client.videos.list()), "videos.list")
    check(client.videos.delete(v.id).deleted, "videos.delete")
    try:
        client.videos.retrieve(v.id)
        raise AssertionError("a deleted video is still there")
    except openai.NotFoundError:
        pass
    print("openai client: images, streaming, models, videos: ok")


def readme_example(base, workdir):
    """Runs the README's OpenAI example as written, only pointed at this server."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index("```python\n", text.index("The official OpenAI client")) + len("```python\n")
    code = text[start : text.index("```", start)]
    check("http://localhost:8080/v1" in code, "the README example's base_url")
    code = code.replace("http://localhost:8080/v1", f"{base}/v1")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=120
    )
    check(out.returncode == 0, f"README example failed: {out.stderr[-2000:]}")
    check(out.stdout.strip() == "decoded a 32x32 PNG", f"README example printed {out.stdout!r}")
    print("README example: " + out.stdout.strip())


def generated_client(base, workdir):
    out = os.path.join(workdir, "generated")
    subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "openapi-python-client"),
            "generate",
            "--path",
            os.path.join(ROOT, "openapi", "openapi.json"),
            "--output-path",
            out,
            "--overwrite",
        ],
        check=True,
    )
    sys.path.insert(0, out)
    from fewstep_client import Client
    from fewstep_client.api.feedback import feedback, generation
    from fewstep_client.api.generation import generate
    from fewstep_client.api.jobs import cancel_job, get_job, job_events
    from fewstep_client.models import FeedbackRequest, GenerateRequest, JobState

    client = Client(base_url=base, raise_on_unexpected_status=True)

    r = generate.sync_detailed(client=client, body=GenerateRequest(prompt="a red circle", seed=5))
    check(r.status_code == 200, f"generate: {r.status_code}")
    gid = r.headers["x-generation-id"]
    body = r.parsed
    check(body.id == gid and body.outputs[0].seed == 5, "generate body")
    check(png_size(base64.b64decode(body.outputs[0].data)) == (32, 32), "generated image")

    # The generated code parses every 200 as JSON; raw media goes through its httpx client.
    http = client.get_httpx_client()
    raw = http.post("/generate", json={"prompt": "a red circle", "seed": 5},
                    headers={"accept": "image/png"})
    check(raw.status_code == 200 and png_size(raw.content) == (32, 32), "raw PNG bytes")
    check(raw.headers["x-seed"] == "5" and raw.headers["x-generation-id"], "raw headers")
    video = http.post("/generate", json={"prompt": "a red circle moving right", "num_frames": 8},
                      headers={"accept": "video/mp4"})
    check(video.status_code == 200 and mp4_samples(video.content) == 8, "raw MP4 bytes")

    r = feedback.sync_detailed(
        client=client, body=FeedbackRequest(generation_id=gid, output_index=0, score=0.75)
    )
    check(r.status_code in (200, 201), f"feedback: {r.status_code} {r.content[:200]!r}")
    g = None
    for _ in range(100):
        r = generation.sync_detailed(id=gid, client=client)
        if r.status_code == 200 and r.parsed.feedback:
            g = r.parsed
            break
        time.sleep(0.05)
    check(g is not None and g.feedback[0].score == 0.75, "generation with its feedback")

    r = generate.sync_detailed(
        client=client, body=GenerateRequest(prompt="a blue square", steps=4), prefer="respond-async"
    )
    check(r.status_code == 202, f"respond-async: {r.status_code}")
    jid = r.parsed.id
    check(r.headers["location"] == f"/jobs/{jid}", "Location")
    ev = job_events.sync_detailed(id=jid, client=client)
    names = [
        line.split(":", 1)[1].strip()
        for line in ev.content.decode().splitlines()
        if line.startswith("event:")
    ]
    check(names and names[-1] == "completed", f"job events {names}")
    check(all(n in ("queued", "progress") for n in names[:-1]), f"job events {names}")
    job = get_job.sync(id=jid, client=client)
    check(job.state == JobState.COMPLETED and job.progress == 100, f"job {job.state}")
    check(job.result.outputs[0].media_type == "image/png", "job result")
    r = cancel_job.sync_detailed(id=jid, client=client)
    check(r.status_code == 409, f"cancelling a finished job: {r.status_code}")
    r = get_job.sync_detailed(id="gen_none", client=client)
    check(r.status_code == 404, f"unknown job: {r.status_code}")
    print("generated client: generate (JSON, PNG, MP4), feedback, generations, jobs: ok")


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/debug/fewstep")
    with serving(binary) as (base, workdir):
        readme_example(base, workdir)
        openai_client(base)
        generated_client(base, workdir)


if __name__ == "__main__":
    main()
