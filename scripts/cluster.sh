#!/usr/bin/env bash
# `make cluster` / `make cluster-stop`: a local Redis Cluster of 3 primaries and 3
# replicas with the module, on 127.0.0.1 ports BASE..BASE+5 (state in .cluster/).
#   scripts/cluster.sh start [BASE [MODULE]]   BASE defaults to $CLUSTER_PORT, else 7100
#   scripts/cluster.sh stop
# Example plans are applied through the tollgate CLI. Stop stops exactly the
# processes whose pid files it started; start refuses ports another server holds.
set -euo pipefail
cd "$(dirname "$0")/.."

action=${1:-start}
base=${2:-${CLUSTER_PORT:-7100}}
module=${3:-$PWD/target/release/libtollgate.so}
cli=${TOLLGATE_CLI:-target/release/tollgate}
dir=$PWD/.cluster

stop() {
    for pidfile in "$dir"/*/redis.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" && echo "stopped node pid $pid ($(basename "$(dirname "$pidfile")"))"
        fi
    done
    for _ in $(seq 1 50); do
        alive=0
        for pidfile in "$dir"/*/redis.pid; do
            [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && alive=1
        done
        [ $alive -eq 0 ] && break
        sleep 0.1
    done
    rm -rf "$dir"
}

if [ "$action" = stop ]; then
    stop
    exit 0
fi

stop
for i in 0 1 2 3 4 5; do
    if redis-cli -p $((base + i)) ping >/dev/null 2>&1; then
        echo "a server make cluster did not start answers on 127.0.0.1:$((base + i)); leaving it" \
            "alone. Pick other ports: make cluster CLUSTER_PORT=$((base + 10))" >&2
        exit 1
    fi
done
mkdir -p "$dir"
nodes=()
for i in 0 1 2 3 4 5; do
    port=$((base + i))
    mkdir -p "$dir/$port"
    redis-server --port "$port" --bind 127.0.0.1 --daemonize yes \
        --dir "$dir/$port" --logfile "$dir/$port/redis.log" --pidfile "$dir/$port/redis.pid" \
        --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 3000 \
        --appendonly yes --loadmodule "$module"
    nodes+=("127.0.0.1:$port")
done
for n in "${nodes[@]}"; do
    for _ in $(seq 1 50); do
        redis-cli -h "${n%:*}" -p "${n#*:}" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
done
redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >/dev/null
# Ready when every node agrees the cluster is ok and the seed sees 3 replicas.
for _ in $(seq 1 150); do
    ok=1
    for n in "${nodes[@]}"; do
        redis-cli -h "${n%:*}" -p "${n#*:}" cluster info | grep -q cluster_state:ok || ok=0
    done
    [ "$(redis-cli -p "$base" cluster nodes | grep -c slave)" -eq 3 ] || ok=0
    [ $ok -eq 1 ] && break
    sleep 0.2
done
"$cli" --cluster --url "redis://127.0.0.1:$base" plans apply examples/plans.json | tail -1
cat <<MSG

A 3-primary / 3-replica cluster runs on 127.0.0.1:$base-$((base + 5)) (state in .cluster/).
  redis-cli -c -p $base RL.ACQUIRE user:42 free 1 COST token 500 ID req-1
  redis-cli -c -p $base RL.RELEASE user:42 req-1 COST token 120
  redis-cli -c -p $base RL.CREDITS.GRANT {acct:7}:credits 1000
  redis-cli -c -p $base RL.ACQUIRE {acct:7}:rl pro CREDITS {acct:7}:credits 10 TTL 1000
  $cli --cluster --url redis://127.0.0.1:$base plans show
  $cli --cluster --url redis://127.0.0.1:$base usage user:42 free
Stop it with: make cluster-stop
MSG
