#!/usr/bin/env bash
# The dirty count's cost, on one thread and on two threads at once, three ways in one criterion
# run (repeated N times):
#
#   scripts/count-cost/run.sh [BEFORE] [N] [NOCOUNT]
#
# BEFORE: a commit with the previous count (default 01638da, two global counters);
# NOCOUNT: a commit without any count (default 8f0147e); "after" is this working tree.
# Exports both commits under /tmp/pagehint-count-cost (their versions renamed so that all three
# can be dependencies of one crate), builds a scratch crate depending on them, runs `cost.rs`
# N times (default 5), and prints per case the median time of each side and the median and
# range over the runs of after/before and after/nocount. Timings on a shared machine are
# noisy: the ratios within a run are what to read. CASES=WORD runs only the cases whose name
# contains WORD (criterion's filter, e.g. CASES=2t_ for the two-thread ones). The scratch
# crate's build directory is kept between invocations.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
before=${1:-01638da}
runs=${2:-5}
nocount=${3:-8f0147e}
dir=/tmp/pagehint-count-cost
rm -rf "$dir/before" "$dir/nocount" "$dir/bench/target/criterion" "$dir/bench/ratios.txt"
mkdir -p "$dir/before" "$dir/nocount" "$dir/bench/benches" "$dir/bench/src"
git -C "$repo" archive "$before" | tar -x -C "$dir/before"
git -C "$repo" archive "$nocount" | tar -x -C "$dir/nocount"
sed -i '0,/^version = "0.1.0"/s//version = "0.0.1"/' "$dir/before/Cargo.toml"
sed -i '0,/^version = "0.1.0"/s//version = "0.0.2"/' "$dir/nocount/Cargo.toml"
cp "$repo/scripts/count-cost/cost.rs" "$dir/bench/benches/cost.rs"
: >"$dir/bench/src/lib.rs"
cat >"$dir/bench/Cargo.toml" <<TOML
[package]
name = "count-cost"
version = "0.0.0"
edition = "2021"
publish = false

[workspace]

[dependencies]
nocount = { package = "pagehint", path = "$dir/nocount" }
before = { package = "pagehint", path = "$dir/before" }
after = { package = "pagehint", path = "$repo" }
criterion = { version = "0.8", default-features = false, features = ["cargo_bench_support"] }

[[bench]]
name = "cost"
harness = false
TOML
cd "$dir/bench"
cargo bench --bench cost --no-run
bin=$(ls -t target/release/deps/cost-* | grep -v '\.d$' | head -1)
: >ratios.txt
for i in $(seq "$runs"); do
    "$bin" --bench ${CASES:+"$CASES"} >/dev/null 2>&1
    for g in target/criterion/*/; do
        name=$(basename "$g")
        est() { echo "$g/$1/new/estimates.json"; }
        [[ -f $(est nocount) && -f $(est before) && -f $(est after) ]] || continue
        python3 -c "import json,sys; e=lambda p: json.load(open(p))['median']['point_estimate']; print(sys.argv[1], *(e(p) for p in sys.argv[2:]))" \
            "$name" "$(est nocount)" "$(est before)" "$(est after)" >>ratios.txt
    done
done
python3 - <<'PY'
from collections import defaultdict
import statistics
r = defaultdict(list)
for line in open('ratios.txt'):
    name, z, b, a = line.split()
    r[name].append((float(z), float(b), float(a)))
def spread(xs):
    xs = sorted(xs)
    return f"{statistics.median(xs):.2f} ({xs[0]:.2f}-{xs[-1]:.2f})"
print("case: median ns nocount / before / after; after/before, after/nocount: median (range), runs")
for name, v in sorted(r.items()):
    med = [statistics.median(x[k] for x in v) for k in range(3)]
    print(f"{name}: {med[0]:.2f} / {med[1]:.2f} / {med[2]:.2f} ns; "
          f"after/before {spread([a / b for _, b, a in v])}, "
          f"after/nocount {spread([a / z for z, _, a in v])}, {len(v)} runs")
PY
