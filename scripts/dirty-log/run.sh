#!/usr/bin/env bash
# KVM's dirty log re-protected at every sync (`--dirty-log auto`) against manual clearing as
# the precopy drain sends (`--dirty-log manual`): the harness's precopy of a KVM guest, the two
# alternating, N runs each, and per setting the median and range of what the runs report:
#
#   scripts/dirty-log/run.sh [N] [WORKLOADS] [extra pagehint-migrate flags...]
#
# N: runs of each setting (default 3); WORKLOADS: comma separated (default random,seq). Each
# run: a 2-vCPU, 1 GiB KVM guest, 3 precopy rounds, preempt-hint (`--mem`, `--vcpus`,
# `--precopy-rounds`, ... given after WORKLOADS override these). Needs /dev/kvm and root
# (userfaultfd). Timings on a shared machine are noisy: compare medians of the same run.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
runs=${1:-3}
workloads=${2:-random,seq}
shift $(( $# < 2 ? $# : 2 ))
out=/tmp/pagehint-dirty-log
rm -rf "$out" && mkdir -p "$out"
cd "$repo"
cargo build --release -p pagehint-migrate
for i in $(seq "$runs"); do
    for m in auto manual; do
        ./target/release/pagehint-migrate --guest kvm --vcpus 2 --mem 1G --precopy-rounds 3 \
            --modes preempt-hint --workloads "$workloads" --dirty-log "$m" --quiet \
            --json "$out/$m-$i.json" "$@" >"$out/$m-$i.log" 2>&1
    done
done
python3 - "$out" <<'PY'
import glob, json, statistics, sys
out = sys.argv[1]
rows = {}
for f in sorted(glob.glob(f"{out}/*.json")):
    m = f.split("/")[-1].split("-")[0]
    for r in json.load(open(f)):
        rows.setdefault((r["workload"], m), []).append(r)
def fmt(xs, p=0):
    xs = sorted(xs)
    return f"{statistics.median(xs):.{p}f} ({xs[0]:.{p}f}-{xs[-1]:.{p}f})"
metrics = [
    ("verified", lambda r: float(r["verified"]), 0),
    ("rounds done", lambda r: r["precopy_rounds_done"], 0),
    ("KVM page faults in precopy", lambda r: r["precopy_kvm_faults"] or 0, 0),
    ("TLB flushes in precopy", lambda r: r["precopy_kvm_tlb_flushes"] or 0, 0),
    ("round 0 ms", lambda r: r["precopy_round_ms"][0], 1),
    ("round 1 ms", lambda r: r["precopy_round_ms"][1] if len(r["precopy_round_ms"]) > 1 else 0, 1),
    ("round 2 ms", lambda r: r["precopy_round_ms"][2] if len(r["precopy_round_ms"]) > 2 else 0, 1),
    ("sync ms (mean per sync)", lambda r: statistics.mean(r["precopy_sync_ms"]), 2),
    ("dirty pages round 1", lambda r: r["dirty_per_round"][1] if len(r["dirty_per_round"]) > 1 else 0, 0),
    ("dirty pages round 2", lambda r: r["dirty_per_round"][2] if len(r["dirty_per_round"]) > 2 else 0, 0),
    ("pages sent in precopy", lambda r: r["precopy_pages"], 0),
    ("guest ops/s in precopy", lambda r: r["progress_before_per_s"] or 0, 0),
    ("KVM faults per 1000 guest ops", lambda r: 1000 * (r["precopy_kvm_faults"] or 0) / max(1, r["guest_ops_precopy"]), 1),
    ("downtime ms", lambda r: r["downtime_ms"], 1),
    ("clears (pages)", lambda r: r["kvm_log_cleared_pages"], 0),
]
for (w, m), rs in sorted(rows.items()):
    print(f"{w} / --dirty-log {m} ({len(rs)} runs): median (range)")
    for name, f, p in metrics:
        print(f"  {name}: {fmt([f(r) for r in rs], p)}")
PY
