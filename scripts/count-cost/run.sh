#!/usr/bin/env bash
# The dirty count's cost, before and after, in one criterion run (repeated N times):
#
#   scripts/count-cost/run.sh [BASE] [N]     (BASE: the commit before the count, default 8f0147e)
#
# Exports BASE into /tmp/pagehint-count-cost/before (its version renamed so that both can be
# dependencies of one crate), builds a scratch crate depending on it and on this working tree,
# runs `cost.rs` N times (default 5), and prints per case the median of each side and the
# median and range of after/before over the runs. Timings on a shared machine are noisy: the
# ratios within a run are what to read.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
base=${1:-8f0147e}
runs=${2:-5}
dir=/tmp/pagehint-count-cost
rm -rf "$dir" && mkdir -p "$dir/before" "$dir/bench/benches" "$dir/bench/src"
git -C "$repo" archive "$base" | tar -x -C "$dir/before"
sed -i '0,/^version = "0.1.0"/s//version = "0.0.1"/' "$dir/before/Cargo.toml"
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
    "$bin" --bench >/dev/null 2>&1
    for g in target/criterion/*/; do
        name=$(basename "$g")
        [[ -f "$g/before/new/estimates.json" && -f "$g/after/new/estimates.json" ]] || continue
        python3 -c "import json,sys; e=lambda p: json.load(open(p))['median']['point_estimate']; print(sys.argv[1], e(sys.argv[2]), e(sys.argv[3]))" \
            "$name" "$g/before/new/estimates.json" "$g/after/new/estimates.json" >>ratios.txt
    done
done
python3 - <<'PY'
from collections import defaultdict
import statistics
r = defaultdict(list)
for line in open('ratios.txt'):
    name, b, a = line.split()
    r[name].append((float(b), float(a)))
for name, v in sorted(r.items()):
    rs = sorted(a / b for b, a in v)
    print(f"{name}: before {statistics.median(b for b, _ in v):.2f} ns, after "
          f"{statistics.median(a for _, a in v):.2f} ns; after/before median "
          f"{statistics.median(rs):.3f} (range {rs[0]:.3f}-{rs[-1]:.3f}, {len(rs)} runs)")
PY
