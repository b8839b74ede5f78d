#!/usr/bin/env python3
"""Splits compare-qemu's CPU per GiB into the urgent path (per request) and the bulk path
(per GiB), from its JSON: `scripts/qemu-cpu-split.py qemu.json [--modes preempt,preempt-hint]`.

The migration threads are the ones compare-qemu charges (cpu_threads). The urgent path is
what runs once per request: the destination's fault thread and urgent receiver, the
source's return path (QEMU: mig/dst/fault, mig/dst/preempt, mig/src/return; pagehint:
ph/dst/fault, ph/dst/urgent, ph/src/return); the bulk path is the rest (QEMU:
mig/src/main, mig/dst/listen; pagehint: ph/src/bulk, ph/dst/bulk). Untraced, completed rows
only; QEMU 10.0 is left out (no hint). The guest's operations per second in postcopy say
how far each guest got (a guest that runs further touches more pages not there yet). Prints one markdown row per link, workload,
transport, peer and mode: medians over the repeats.
"""
import json
import statistics
import sys
from collections import defaultdict

URGENT = {
    "dst:mig/dst/fault", "dst:mig/dst/preempt", "src:mig/src/return",
    "dst:ph/dst/fault", "dst:ph/dst/urgent", "src:ph/src/return",
}


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    modes = {"preempt", "preempt-hint"}
    if len(sys.argv) > 3 and sys.argv[2] == "--modes":
        modes = set(sys.argv[3].split(","))
    rows = json.load(open(sys.argv[1]))["rows"]
    groups = defaultdict(list)
    for r in rows:
        if not r.get("completed") or r.get("traced") or r["mode"] not in modes:
            continue
        if r["peer"].startswith("QEMU 10"):
            continue
        gib = r["postcopy_bytes"] / 2**30
        if gib <= 0 or r["requests"] <= 0:
            # A guest that made no request (its vCPU did not run during postcopy) has no
            # CPU per request: said, and left out of the medians.
            print(f"left out: repeat {r['repeat']} {r['link']} {r['workload']} "
                  f"{r['transport']} {r['peer']} {r['mode']}: {r['postcopy_bytes']} bytes, "
                  f"{r['requests']} requests", file=sys.stderr)
            continue
        urgent = sum(v for k, v in r["cpu_threads"].items() if k in URGENT)
        bulk = r["cpu_ms"] - urgent
        key = (r["link"], r["workload"], r["transport"], r["peer"], r["mode"])
        groups[key].append((urgent * 1000 / r["requests"], urgent / gib, bulk / gib,
                            r["requests"], r["cpu_ms_per_gib"],
                            r.get("ops_postcopy_per_s") or 0.0))
    print("| link | workload | transport | peer, mode | urgent CPU per request | urgent ms/GiB "
          "| bulk ms/GiB | requests | all ms/GiB | guest ops/s in postcopy |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for key in sorted(groups):
        v = groups[key]
        med = [statistics.median(x[i] for x in v) for i in range(6)]
        link, workload, transport, peer, mode = key
        print(f"| {link} | {workload} | {transport} | {peer} {mode} | {med[0]:.0f} µs "
              f"| {med[1]:.0f} | {med[2]:.0f} | {med[3]:.0f} | {med[4]:.0f} | {med[5]:,.0f} |")


if __name__ == "__main__":
    main()
