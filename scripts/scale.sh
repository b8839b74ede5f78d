#!/usr/bin/env bash
# The size table: postcopy throughput, downtime (and its stages), request p50/p99 and peak
# RSS of KVM migrations per guest size (preempt-hint, random workload, pure postcopy, every
# run verified), each beside the machine's own curve measured in the same minute: a plain
# UFFDIO_COPY loop over the same size with no migration around it (example uffd_curve).
#
#   scripts/scale.sh [SIZE...]          default: 256M 1G 2G 3G 4G 6G max
#
# Per size, SCALE_REPEAT times (default 1): the plain loop, a migration over the default
# link (10 Gbit/s, 50 µs) and one over an unlimited link (--bandwidth 0: what the program
# itself can do on this machine); the row shows medians (with the range when repeated).
# `max` is the largest guest whose two copies (source and destination) fit in the memory
# available now with SCALE_HEADROOM_GIB (3) GiB to spare, in whole GiB; a size that does not
# fit is skipped and said so. Writes target/scale/{SIZE}-{i}{,-bw0,-curve}.json, the peak RSS
# of each migration (KiB, GNU time) beside its JSON as .rss, and table.md; prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v jq >/dev/null || { echo "scale.sh needs jq (apt-get install jq)" >&2; exit 2; }
[ -x /usr/bin/time ] || { echo "scale.sh needs GNU time (apt-get install time)" >&2; exit 2; }

mode=${SCALE_MODE:-preempt-hint}
workload=${SCALE_WORKLOAD:-random}
repeat=${SCALE_REPEAT:-1}
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
  case $1 in
    *G) echo $(( ${1%G} << 30 )) ;;
    *M) echo $(( ${1%M} << 20 )) ;;
    *) echo "$1" ;;
  esac
}
migrate() { # SIZE JSON [FLAGS...]: one migration; its peak RSS (KiB) in JSON's .rss
  local size=$1 json=$2
  shift 2
  /usr/bin/time -f %M -o "${json%.json}.rss" \
    "$bin" --mem "$size" --modes "$mode" --workloads "$workload" --json "$json" --quiet "$@" \
    | grep -E "^$workload" || true
}

# The median (and range, when there are several) of what jq filter $2 gives for each file.
stat() { # DECIMALS FILTER FILE...
  local d=$1 f=$2
  shift 2
  jq -rs --argjson d "$d" "map($f) | sort | (length) as \$n |
    def r: (. * pow(10; \$d) | round) / pow(10; \$d);
    (if \$n % 2 == 1 then .[(\$n - 1) / 2] else (.[\$n / 2 - 1] + .[\$n / 2]) / 2 end | r | tostring)
    + (if \$n > 1 then \" (\(first | r)–\(last | r))\" else \"\" end)" "$@"
}

rows=()
for size in "${sizes[@]}"; do
  if [ "$size" = max ]; then
    size="$(( ($(available) - headroom) / 2 >> 30 ))G"
    echo "max: $size (two copies and $((headroom >> 30)) GiB to spare in $(( $(available) >> 20 )) MiB available)"
  fi
  need=$(( 2 * $(bytes "$size") + headroom ))
  if [ "$(available)" -lt "$need" ]; then
    echo "skipped $size: two copies and the headroom need $((need >> 20)) MiB, $(( $(available) >> 20 )) MiB available"
    continue
  fi
  loads=() runs=() bw0=() curves=() rsss=()
  for i in $(seq 1 "$repeat"); do
    if [ "$(available)" -lt "$need" ]; then
      echo "run $i at $size skipped: $((need >> 20)) MiB needed, $(( $(available) >> 20 )) MiB available"
      break
    fi
    loads+=("$(cut -d' ' -f1 /proc/loadavg)")
    echo "== $size, run $i of $repeat (load ${loads[-1]})"
    "$curve" "$size" --json "$out/$size-$i-curve.json" | grep -v '^wrote'
    migrate "$size" "$out/$size-$i.json"
    migrate "$size" "$out/$size-$i-bw0.json" --bandwidth 0
    jq -e 'all(.rows[]; .verified)' "$out/$size-$i.json" "$out/$size-$i-bw0.json" >/dev/null ||
      { echo "a run at $size did not verify" >&2; exit 1; }
    runs+=("$out/$size-$i.json") bw0+=("$out/$size-$i-bw0.json") curves+=("$out/$size-$i-curve.json")
    rsss+=("$(tail -1 "$out/$size-$i.rss")")
  done
  [ ${#runs[@]} -gt 0 ] || continue
  rss=$(printf '%s\n' "${rsss[@]}" | jq -rs --argjson g "$(bytes "$size")" \
    'max as $m | "\($m / 1048576 * 100 | round / 100) GiB (\($m * 1024 / $g * 1000 | round / 1000)×)"')
  rows+=("| $size | $(stat 0 '.rows[0].throughput_mib_s' "${runs[@]}") | $(stat 0 '.rows[0].throughput_mib_s' "${bw0[@]}") | $(stat 0 '.[0].throughput_mib_s' "${curves[@]}") | $(stat 2 '.rows[0].downtime_ms' "${runs[@]}") | $(for k in stop sync build link apply resume; do stat 2 ".rows[0].downtime_stages_ms.$k" "${runs[@]}" | cut -d' ' -f1; done | paste -sd/ | sed 's|/| / |g') | $(stat 0 '.rows[0].request_p50_us' "${runs[@]}") / $(stat 0 '.rows[0].request_p99_us' "${runs[@]}") µs | $rss | $(IFS=,; echo "${loads[*]}") |")
done

{
  echo "| guest | postcopy MiB/s, 10 Gbit/s link | unlimited link | plain UFFDIO_COPY | downtime ms | stop / sync / build / link / apply / resume (ms) | random p50 / p99 | peak RSS (× guest) | load |"
  echo "|---|---:|---:|---:|---:|---|---:|---:|---:|"
  printf '%s\n' "${rows[@]}"
} | tee "$out/table.md"
