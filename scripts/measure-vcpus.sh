#!/usr/bin/env bash
# Issue 21's measurement on the pagehint side: one hint slot (preempt-hint) against a slot per
# vCPU (preempt-hints) at 1, 2 and 4 vCPUs, 4 KiB and 2 MiB host pages, every workload, the
# medians of REPEAT repeats each. Needs root and KVM (and hugetlb pages for 2M).
#
#   scripts/measure-vcpus.sh [OUT_DIR] [REPEAT]      (defaults: target/measure-vcpus, 3)
#
# Writes OUT_DIR/v{N}-{4K,2M}.{txt,json,svg}: the printed table and targets (medians, with
# each target's range over the repeats), every run's JSON, the plot of the medians; and the
# load average before and after each invocation (the figures are only as quiet as the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/measure-vcpus}
repeat=${2:-3}
mkdir -p "$out"
cargo build --release -p pagehint-migrate
bin=target/release/pagehint-migrate
for hp in 4K 2M; do
    for n in 1 2 4; do
        name="v$n-$hp"
        echo "== $name: load $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$out/$name.txt"
        "$bin" --vcpus "$n" --host-page "$hp" --modes preempt-hint,preempt-hints \
            --workloads seq,random,stream,kv,mixed --repeat "$repeat" --quiet \
            --json "$out/$name.json" --svg "$out/$name.svg" 2>&1 | tee -a "$out/$name.txt" || true
        echo "== $name done: load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/$name.txt"
    done
done
