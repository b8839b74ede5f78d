#!/usr/bin/env bash
# Issue 21 against QEMU 11.1: several vCPU streams that together ask for less than the link
# gives (a quarter to a half of 1 Gbit/s), where following every stream can pay, on both
# peers with the same guest, link and transports. One slot (preempt-hint, the seed's) and a
# slot per vCPU (preempt-hints) against QEMU 11.1 postcopy-preempt with its hint; medians of
# REPEAT repeats, each target's range over the repeats. Needs root, KVM, QEMU 11.1
# (scripts/install-deps.sh) and, for 2M, hugetlb pages.
#
#   scripts/measure-streams-qemu.sh [OUT_DIR] [REPEAT] [STREAM_RATE]
#       (defaults: target/measure-streams-qemu, 3, 64M: 64 MiB/s for all the vCPUs together;
#       1 vCPU runs three times REPEAT)
#
# Writes OUT_DIR/v{N}-{4K,2M}-{workloads}.{txt,json,svg} and the load average before and
# after each invocation (the figures are only as quiet as the machine). About 25 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/measure-streams-qemu}
base=${2:-3}
rate=${3:-64M}
mkdir -p "$out"
cargo build --release -p pagehint-migrate -p pagehint-pace-preload
bin=target/release/pagehint-migrate
# vCPUs, host page, workloads: seq reads as fast as it can (link-bound whatever the
# scheduler does: the loss is reported beside the stream's win); 1 vCPU is the control.
# 1 vCPU faults a handful of times per run and its figures are bimodal (a run whose stream
# catches the scan at its first fault pays a burst of faults, in both modes): three times the
# repeats there.
for spec in "4 4K seq,stream 1" "2 4K stream 1" "4 2M stream 1" "1 4K stream 3"; do
    read -r n hp work times <<<"$spec"
    repeat=$((base * times))
    name="v$n-$hp-${work//,/-}"
    echo "== $name: load $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$out/$name.txt"
    "$bin" compare-qemu --vcpus "$n" --host-page "$hp" --workloads "$work" \
        --stream-rate "$rate" --links 1G --qemu-modes preempt \
        --modes preempt-hint,preempt-hints --qemu10 none --trace-cost off --repeat "$repeat" \
        --json "$out/$name.json" --svg "$out/$name.svg" 2>&1 | tee -a "$out/$name.txt" || true
    echo "== $name done: load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/$name.txt"
done
