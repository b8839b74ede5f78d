#!/usr/bin/env bash
# The size table: postcopy throughput, downtime (and its stages), request p50/p99 and peak
# RSS of one KVM migration per guest size (preempt-hint, random workload, default link,
# every run verified), each beside the machine's own curve measured in the same minute: a
# plain UFFDIO_COPY loop over the same size with no migration around it (example uffd_curve).
#
#   scripts/scale.sh [SIZE...]          default: 256M 1G 2G 3G 4G 6G max
#
# `max` is the largest guest whose two copies (source and destination) fit in the memory
# available now with 3 GiB to spare, in whole GiB. A size that does not fit is skipped and
# said so. Writes target/scale/{SIZE}.json (the harness's result), {SIZE}-curve.json (the
# plain loop's), {SIZE}.rss (peak RSS, KiB) and table.md (the table below), and prints it.
# Environment: SCALE_MODE (preempt-hint), SCALE_WORKLOAD (random), SCALE_HEADROOM_GIB (3).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v jq >/dev/null || { echo "scale.sh needs jq (apt-get install jq)" >&2; exit 2; }
[ -x /usr/bin/time ] || { echo "scale.sh needs GNU time (apt-get install time)" >&2; exit 2; }

mode=${SCALE_MODE:-preempt-hint}
workload=${SCALE_WORKLOAD:-random}
headroom=$(( ${SCALE_HEADROOM_GIB:-3} << 30 ))
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(256M 1G 2G 3G 4G 6G max)
out=target/scale
mkdir -p "$out"

nice -n 10 cargo build --release -q -p pagehint-migrate --bin pagehint-migrate --example uffd_curve
bin=target/release/pagehint-migrate
curve=target/release/examples/uffd_curve

available() { echo $(( $(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo) << 10 )); }
bytes() {
  local s=$1
  case $s in
    *G) echo $(( ${s%G} << 30 )) ;;
    *M) echo $(( ${s%M} << 20 )) ;;
    *) echo "$s" ;;
  esac
}

rows=()
for size in "${sizes[@]}"; do
  if [ "$size" = max ]; then
    size="$(( ($(available) - headroom) / 2 >> 30 ))G"
    echo "max: ${size} (two copies and $((headroom >> 30)) GiB to spare in $(( $(available) >> 20 )) MiB available)"
  fi
  need=$(( 2 * $(bytes "$size") + headroom ))
  if [ "$(available)" -lt "$need" ]; then
    echo "skipped $size: two copies and the headroom need $((need >> 20)) MiB, $(( $(available) >> 20 )) MiB available"
    continue
  fi
  load=$(cut -d' ' -f1 /proc/loadavg)
  echo "== $size (load $load)"
  "$curve" "$size" --json "$out/$size-curve.json" | grep -v '^wrote'
  /usr/bin/time -f %M -o "$out/$size.rss" \
    "$bin" --mem "$size" --modes "$mode" --workloads "$workload" --json "$out/$size.json" --quiet \
    | grep -E "^$workload|warm-up" || true
  rss=$(tail -1 "$out/$size.rss")
  rows+=("$(jq -r --arg size "$size" --arg load "$load" --argjson rss "$rss" \
    --slurpfile c "$out/$size-curve.json" '.[0] as $r | $c[0][0] as $k |
    "| \($size) | \($r.throughput_mib_s | round) | \($k.throughput_mib_s | round) | \(100 * $r.throughput_mib_s / $k.throughput_mib_s | round)% | \($r.downtime_ms * 100 | round / 100) ms | \($r.downtime_stages_ms | "\(.stop * 100 | round / 100) / \(.sync * 100 | round / 100) / \(.build * 100 | round / 100) / \(.link * 100 | round / 100) / \(.apply * 100 | round / 100) / \(.resume * 100 | round / 100)") | \($r.request_p50_us | round) / \($r.request_p99_us | round) µs | \($rss / 1048576 * 100 | round / 100) GiB (\($rss * 1024 / $r.mem_bytes * 100 | round / 100)×) | \(if $r.verified then "yes" else "NO" end) | \($load) |"' \
    "$out/$size.json")")
done

{
  echo "| guest | postcopy MiB/s | plain UFFDIO_COPY MiB/s | ours / plain | downtime | stages: stop / sync / build / link / apply / resume (ms) | random p50 / p99 | peak RSS (× guest) | verified | load |"
  echo "|---|---:|---:|---:|---:|---|---:|---:|---|---:|"
  printf '%s\n' "${rows[@]}"
} | tee "$out/table.md"
