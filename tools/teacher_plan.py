"""Sizes a `train-teacher` run to a time budget (used by tools/gpu-teacher.sh).

  teacher_plan.py probe CONFIG STEPS OUT.json        CONFIG cut to a short step-time probe
  teacher_plan.py steptime CONFIG METRICS.jsonl      seconds per step, steady state
  teacher_plan.py scale CONFIG ITERATIONS OUT.json   CONFIG with every step count scaled
  teacher_plan.py manifest CONFIG NAME OUT.toml      a manifest to eval the run's weights

`scale` keeps the schedule's shape: warmup, the curriculum's hold and fade, the decay window
and the checkpoint interval are moved in proportion to the new length, so a run sized from a
probe still decays over the same last share of its steps.
"""
import json
import math
import sys
from pathlib import Path

MANIFEST = Path(__file__).resolve().parent.parent / "models/tiny-shapes-teacher/manifest.toml"


def load(path):
    return json.loads(Path(path).read_text())


def save(cfg, path):
    Path(path).write_text(json.dumps(cfg, indent=2) + "\n")


def probe(cfg, steps, out):
    cfg = dict(cfg, iterations=steps, log_every=max(1, steps // 4), checkpoint_every=10 * steps)
    cfg["optim"] = dict(cfg["optim"], warmup_steps=max(1, steps // 4))
    cfg["optim"].pop("decay", None)
    cfg.pop("curriculum", None)
    save(cfg, out)


def steptime(cfg, metrics):
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    # The first window holds the start-up (kernel loading, first allocations); skip it.
    steady = rows[1:] or rows
    sps = sum(r["samples_per_s"] for r in steady) / len(steady)
    print(f"{(cfg['image_batch'] + cfg['video_batch']) / sps:.4f}")


def scale(cfg, iterations, out):
    f = iterations / cfg["iterations"]

    def at(step):
        return max(1, round(step * f))

    cfg = json.loads(json.dumps(cfg))
    cfg["iterations"] = iterations
    cfg["checkpoint_every"] = at(cfg["checkpoint_every"])
    cfg["log_every"] = max(1, min(cfg["log_every"], iterations // 40))
    o = cfg["optim"]
    o["warmup_steps"] = min(o["warmup_steps"], max(1, iterations // 10))
    if "decay" in o:
        o["decay"]["start"] = at(o["decay"]["start"])
        o["decay"]["end"] = iterations
    if "curriculum" in cfg:
        c = cfg["curriculum"]
        c["hold"] = at(c["hold"])
        c["until"] = max(c["hold"], at(c["until"]))
    save(cfg, out)


def manifest(cfg, name, out):
    head, rest = MANIFEST.read_text().split("[architecture]", 1)
    tail = rest[rest.index("[sampling]"):]
    head = head.replace('name = "tiny-shapes-teacher"', f'name = "{name}"')
    arch = "\n".join(f"{k} = {json.dumps(v)}" for k, v in cfg["architecture"].items())
    Path(out).write_text(f"{head}[architecture]\n{arch}\n\n{tail}")


def main(argv):
    cmd, cfg = argv[0], load(argv[1])
    if cmd == "probe":
        probe(cfg, int(argv[2]), argv[3])
    elif cmd == "steptime":
        steptime(cfg, argv[2])
    elif cmd == "scale":
        scale(cfg, max(1, math.floor(float(argv[2]))), argv[3])
    elif cmd == "manifest":
        manifest(cfg, argv[2], argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
