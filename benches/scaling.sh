#!/bin/sh
# Scaling table for BENCHMARKS.md: the contention cases with 1, 2, 4, 8 and 16 threads.
#
#   benches/scaling.sh [THREAD_LIST] [extra report options...]
#
# For each N in THREAD_LIST (default 1,2,4,8,16) the report measures, ours against the
# baseline in the same run:
#   scale_mark_random_<N>thread_vs_mutex       N threads marking random pages of a 64 GiB guest
#                                               (pagehint fetch_or vs one mutex around a plain bitmap)
#   scale_<N>thread_urgent_p{50,99}_busy_...    (N >= 2) urgent-claim latency with 1 busy background
#                                               sender, 1 urgent thread and N-2 dirty-log mergers
#                                               (pagehint vs the QEMU port)
# Threads are pinned to CPUs 0..N-1 (modulo the CPU count: on a machine with fewer CPUs than N,
# threads share CPUs and the table says so through the CPU count in its "Machine" line).
# Writes target/bench-report-scaling.{json,md} and replaces the table between the
# "bench-report-scaling" markers in BENCHMARKS.md. About 10 s per thread count.
set -eu
cd "$(dirname "$0")/.."
threads="${1:-1,2,4,8,16}"
[ $# -gt 0 ] && shift
exec cargo bench --bench report -- --threads "$threads" --update-benchmarks-md "$@"
