#!/usr/bin/env python3
"""Builds the table of models/tiny-shapes/DISTILL.md from `fewstep eval` reports.

    python3 tools/distill-report.py TEACHER_REPORT RUNS_DIR

TEACHER_REPORT is the teacher's eval/report.json; RUNS_DIR holds one directory per run named
`<method>-<steps>step-seed<k>` with its eval/report.json (as tools/distill-students.sh writes
them). Prints a markdown table: mean and spread (min-max) over seeds of the GenEval-style pass
rate (in-distribution, held-out), the soft reward, Frechet distance and diversity (all
prompts), and network evaluations per sample.
"""

import json
import os
import re
import sys
from collections import defaultdict


def row(report, name):
    return next(r for r in report["rows"] if r["name"] == name)


def metrics(report):
    ind, held, every = row(report, "in-distribution"), row(report, "held-out"), row(report, "all")
    return {
        "in-dist": ind["pass_rate"] * 100,
        "held-out": held["pass_rate"] * 100,
        "reward in": ind["soft_score"],
        "reward held": held["soft_score"],
        "FD": every["frechet_distance"],
        "diversity": every["diversity"],
        "NFE": every["nfe_per_sample"],
    }


def fmt(values, digits):
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main():
    teacher_path, runs = sys.argv[1], sys.argv[2]
    groups = defaultdict(list)
    for d in sorted(os.listdir(runs)):
        m = re.fullmatch(r"(amd|dmd2)-(\d+)step-seed(\d+)", d)
        path = os.path.join(runs, d, "eval", "report.json")
        if m and os.path.isfile(path):
            groups[(m.group(1), int(m.group(2)))].append(metrics(json.load(open(path))))
    teacher = json.load(open(teacher_path))
    s = teacher["settings"]
    rows = [(f"teacher (Euler {s['steps']} steps, CFG {s['guidance']:g})", 1, [metrics(teacher)])]
    order = [("dmd2", 4), ("amd", 4), ("amd", 1)]
    for key in order + sorted(k for k in groups if k not in order):
        if key in groups:
            method, steps = key
            rows.append((f"{method.upper()} {steps}-step", len(groups[key]), groups[key]))
    cols = [("in-dist", 1), ("held-out", 1), ("reward in", 3), ("reward held", 3), ("FD", 2), ("diversity", 3), ("NFE", 0)]
    print("| model | seeds | GenEval-style in-dist % | held-out % | soft reward in-dist | held-out | FD | diversity | NFE |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for name, n, ms in rows:
        cells = [fmt([m[c] for m in ms], d) for c, d in cols]
        print(f"| {name} | {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
