#!/usr/bin/env bash
# The attach path against the transport ceiling, by generator shape, with the load generator and
# the driver pinned to different CPUs (taskset), so each ratio is the driver's own cost per RPC
# against a Probe's rather than two processes sharing cores.
#
# For each shape, each run starts a fresh standalone driver (file backend) pinned to
# $DRIVER_CPUS, then runs `rds-csi-bench --compare` pinned to $GENERATOR_CPUS: a Probe phase,
# then a publish/unpublish phase over 256 volumes, same connections and workers. With
# REFERENCE=/path/to/rds-csi, every run boots the reference build and this tree's build one
# after the other (reference first), so both meet the same machine.
#
# Shapes (connections/generator threads/in flight): the curve 1/1/64, 2/2/64, 4/4/64, 8/8/64,
# 16/16/256, where the driver is told it has as many cores as the shape has connections
# (TOKIO_WORKER_THREADS and --arbiters, as on a machine of that size: its threads then share
# $DRIVER_CPUS, so the curve shows what more threads cost per RPC, not more cores); the issue's
# 4/2/64; and 1/1/1 for latency at one in flight with the driver's defaults.
#
#   cargo build --release --locked --bin rds-csi --bin rds-csi-bench
#   REFERENCE=/tmp/ref/rds-csi benches/scaling.sh            # RUNS=3 DURATION=5s by default
#
# More builds can join the same runs: EXTRA="label=/path/to/rds-csi ..." (labels of letters and
# digits), each booted after the reference and this tree in every run, in the order given. A
# path may be a wrapper script that sets the driver's environment and `exec`s it.
#
# Prints one line per run and phase pair, then the medians. Raw JSON stays in $OUT.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
NEW=${NEW:-$here/target/release/rds-csi}
GEN=${GEN:-$here/target/release/rds-csi-bench}
REFERENCE=${REFERENCE:-}
EXTRA=${EXTRA:-}
RUNS=${RUNS:-3}
DURATION=${DURATION:-5s}
WARMUP=${WARMUP:-1s}
VOLUMES=${VOLUMES:-256}
DRIVER_CPUS=${DRIVER_CPUS:-1}
GENERATOR_CPUS=${GENERATOR_CPUS:-0}
SHAPES=${SHAPES:-"1/1/64/1 2/2/64/2 4/4/64/4 8/8/64/8 16/16/256/16 4/2/64/- 1/1/1/-"}
OUT=${OUT:-$(mktemp -d /tmp/rds-csi-scaling.XXXXXX)}
mkdir -p "$OUT"

drivers=(new)
[[ -n $REFERENCE ]] && drivers=(reference new)
declare -A extra_bins=()
for pair in $EXTRA; do
    label=${pair%%=*}
    [[ $pair == *=* && $label =~ ^[A-Za-z0-9]+$ && $label != new && $label != reference ]] || {
        echo "scaling.sh: EXTRA wants label=path with a label of letters and digits: $pair" >&2
        exit 1
    }
    [[ -z ${extra_bins[$label]:-} ]] || { echo "scaling.sh: EXTRA names $label twice" >&2; exit 1; }
    extra_bins[$label]=${pair#*=}
    drivers+=("$label")
done

for bin in "$NEW" "$GEN" ${REFERENCE:+"$REFERENCE"} "${extra_bins[@]}"; do
    [[ -x $bin ]] || { echo "scaling.sh: $bin is not built (see the header)" >&2; exit 1; }
done
command -v taskset >/dev/null || { echo "scaling.sh: taskset (util-linux) is needed" >&2; exit 1; }

pid=
stop_driver() {
    if [[ -n $pid ]]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        pid=
    fi
}
trap stop_driver EXIT

# one_run DRIVER_LABEL BINARY SHAPE RUN
one_run() {
    local label=$1 bin=$2 shape=$3 run=$4
    local conns threads inflight cores
    IFS=/ read -r conns threads inflight cores <<<"$shape"
    local dir=$OUT/work
    rm -rf "$dir"
    mkdir -p "$dir"
    local env=(RDS_CSI_KNOWN_NODES=node-0,node-1)
    if [[ $cores != - ]]; then
        env+=(TOKIO_WORKER_THREADS="$cores" RDS_CSI_ARBITERS="$cores")
    fi
    env "${env[@]}" taskset -c "$DRIVER_CPUS" "$bin" --kubernetes off \
        --endpoint "unix://$dir/csi.sock" --file-root "$dir/volumes" \
        --metrics-address 127.0.0.1:0 2>"$dir/driver.log" &
    pid=$!
    for _ in $(seq 500); do
        [[ -S $dir/csi.sock ]] && break
        sleep 0.01
    done
    local json=$OUT/$label-${conns}x${threads}x${inflight}c${cores/-/d}-$run.json
    taskset -c "$GENERATOR_CPUS" "$GEN" --endpoint "unix://$dir/csi.sock" \
        --volumes "$VOLUMES" --workers "$inflight" --connections "$conns" --threads "$threads" \
        --compare --duration "$DURATION" --warmup "$WARMUP" --driver-pid "$pid" --json --quiet \
        >"$json"
    stop_driver
    python3 - "$json" "$label" "$shape" "$run" <<'EOF'
import json, sys
path, label, shape, run = sys.argv[1:]
r = json.load(open(path))["rounds"][0]
probe, attach = r[0], r[1]
pp = probe["rpcs"]["probe"]
pub = attach["rpcs"]["publish"]
def per_rpc(p):
    return p["driver_cpu_cores"] / p["rpc_per_s"] * 1e6
print(f"{shape:>12} {label:>9} run {run}: Probe {probe['rpc_per_s']:>9,.0f} RPC/s, "
      f"attach {attach['rpc_per_s']:>9,.0f} RPC/s, ratio {attach['rpc_per_s']/probe['rpc_per_s']:.3f}; "
      f"p50 Probe {pp['p50_us']:.0f} publish {pub['p50_us']:.0f} us ({pub['p50_us']/pp['p50_us']:.2f}); "
      f"driver CPU/RPC {per_rpc(probe):.1f} / {per_rpc(attach):.1f} us; "
      f"driver cores {probe['driver_cpu_cores']:.2f} / {attach['driver_cpu_cores']:.2f}; "
      f"unexpected {attach['unexpected_errors'] + probe['unexpected_errors']}", flush=True)
EOF
}

for shape in $SHAPES; do
    for run in $(seq "$RUNS"); do
        for label in "${drivers[@]}"; do
            case $label in
                new) bin=$NEW ;;
                reference) bin=$REFERENCE ;;
                *) bin=${extra_bins[$label]} ;;
            esac
            one_run "$label" "$bin" "$shape" "$run"
        done
    done
done

echo "-- medians (of $RUNS runs), raw JSON in $OUT"
python3 - "$OUT" "$RUNS" "${drivers[@]}" <<'EOF'
import glob, json, os, statistics, sys
out, runs, labels = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rows = {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    name = os.path.basename(path)[:-5]
    label, shape, _run = name.rsplit("-", 2)
    r = json.load(open(path))["rounds"][0]
    probe, attach = r[0], r[1]
    rows.setdefault((shape, label), []).append((
        probe["rpc_per_s"], attach["rpc_per_s"], attach["rpc_per_s"] / probe["rpc_per_s"],
        probe["rpcs"]["probe"]["p50_us"], attach["rpcs"]["publish"]["p50_us"],
        attach["rpcs"]["publish"]["p50_us"] / probe["rpcs"]["probe"]["p50_us"],
        probe["driver_cpu_cores"] / probe["rpc_per_s"] * 1e6,
        attach["driver_cpu_cores"] / attach["rpc_per_s"] * 1e6,
    ))
print("| shape (conns x threads x in flight, c: driver threads, d: its default) | driver | Probe RPC/s | attach RPC/s | ratio (runs) | "
      "Probe p50 us | publish p50 us | p50 ratio (runs) | driver CPU per RPC, Probe / attach us |")
print("|---|---|---|---|---|---|---|---|---|")
def key(item):
    dims, cores = item[0][0].split("c")
    c, t, f = (int(x) for x in dims.split("x"))
    return (f == 1, cores == "d", c, t, labels.index(item[0][1]))
for (shape, label), samples in sorted(rows.items(), key=key):
    med = [statistics.median(col) for col in zip(*samples)]
    ratios = " · ".join(f"{s[2]:.3f}" for s in samples)
    p50s = " · ".join(f"{s[5]:.2f}" for s in samples)
    print(f"| {shape} | {label} | {med[0]:,.0f} | {med[1]:,.0f} | **{med[2]:.3f}** ({ratios}) | "
          f"{med[3]:.0f} | {med[4]:.0f} | **{med[5]:.2f}** ({p50s}) | {med[6]:.1f} / {med[7]:.1f} |")
EOF
