#!/usr/bin/env python3
"""Why named objects were missed: reads `fewstep eval` reports (report.json) and prints, per
split, the image objects the verifier did not recognise, by what it saw in the sample's first
frame (the records' `seen` list):

- colour right, shape wrong (and which shape was drawn instead);
- shape right, colour wrong;
- colour and shape right but a poor fit (IoU too low to count);
- neither seen (missing, or merged into another object).

For two-object scenes with distinct colours and shapes, it also counts how often a missed
shape was drawn as the *other* object's shape (leakage between the objects).

    python3 tools/eval_misses.py runs/eval/report.json [more reports...]
"""
import collections
import json
import re
import sys

SEEN = re.compile(r"^(\w+) (\w+) \(shape IoU ([0-9.]+)\)")
MISSED = re.compile(r"^(\w+) (\w+): recognised in 0 ")
OBJECT = re.compile(r"\b(red|green|blue|yellow|purple|orange) (circle|square|triangle|cross)\b")


def seen_of(sample):
    return [SEEN.match(s).groups()[:2] for s in sample.get("seen", []) if SEEN.match(s)]


def misses(samples):
    causes, confusion = collections.Counter(), collections.Counter()
    for s in samples:
        seen = seen_of(s)
        for f in s["failures"]:
            m = MISSED.match(f)
            if not m:
                continue
            color, shape = m.groups()
            same_color = [sh for c, sh in seen if c == color]
            if shape in same_color:
                causes["colour and shape right, poor fit"] += 1
            elif same_color:
                causes["colour right, shape wrong"] += 1
                confusion[f"{shape} drawn as {same_color[0]}"] += 1
            elif any(sh == shape for _, sh in seen):
                causes["shape right, colour wrong"] += 1
            else:
                causes["neither seen"] += 1
    return causes, confusion


def leakage(samples):
    """Two-object scenes with distinct colours and shapes: missed shapes drawn as the other's."""
    copied = other = 0
    for s in samples:
        objects = OBJECT.findall(s["prompt"])
        if s["pass"] or len(objects) != 2 or len({c for c, _ in objects}) < 2:
            continue
        if objects[0][1] == objects[1][1]:
            continue
        seen = dict(seen_of(s))
        for (color, shape), (_, other_shape) in [objects, objects[::-1]]:
            drawn = seen.get(color)
            if drawn and drawn != shape:
                copied += drawn == other_shape
                other += drawn != other_shape
    return copied, other


def main(paths):
    for path in paths:
        report = json.load(open(path))
        print(path)
        for split in ["train", "held_out"]:
            samples = [s for s in report["samples"] if s["split"] == split and not s["video"]]
            if not samples:
                continue
            causes, confusion = misses(samples)
            copied, other = leakage(samples)
            print(f"  {split}: {len(samples)} image samples, {sum(causes.values())} objects missed")
            for cause, n in causes.most_common():
                print(f"    {n:4d}  {cause}")
            for pair, n in confusion.most_common(6):
                print(f"          {n:4d}  {pair}")
            print(f"    two objects: a missed shape drawn as the other's {copied}, as a third {other}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
