#!/usr/bin/env bash
# `make run`: starts redis-server with the module on 127.0.0.1:PORT (state in .run/),
# loads the example plans and prints how to try it. `run.sh --stop PORT` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--stop" ]; then
    port=$2
    if redis-cli -p "$port" ping >/dev/null 2>&1; then
        redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
        echo "stopped the server on 127.0.0.1:$port"
    fi
    exit 0
fi

port=$1
module=$2
dir=.run
mkdir -p "$dir"
if redis-cli -p "$port" ping >/dev/null 2>&1; then
    echo "a server already answers on 127.0.0.1:$port; restarting it (make stop to stop it)"
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
    sleep 0.5
fi
redis-server --port "$port" --bind 127.0.0.1 --daemonize yes \
    --dir "$PWD/$dir" --logfile "$PWD/$dir/redis.log" --pidfile "$PWD/$dir/redis.pid" \
    --appendonly yes --appendfsync everysec \
    --loadmodule "$module"
for _ in $(seq 1 50); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.1
done
if ! redis-cli -p "$port" ping >/dev/null 2>&1; then
    echo "redis-server did not start; see $dir/redis.log" >&2
    tail -20 "$dir/redis.log" >&2
    exit 1
fi
target/release/tollgate --url "redis://127.0.0.1:$port" plans apply examples/plans.json >/dev/null
cat <<MSG

Tollgate is running on 127.0.0.1:$port (log: $dir/redis.log; stop it with: make stop).
Plans loaded: $(redis-cli -p "$port" RL.PLAN.LIST | tr '\n' ' ')

Try it:
  redis-cli -p $port RL.PLAN.GET free
  redis-cli -p $port RL.ACQUIRE user:42 free 1 COST token 500
  redis-cli -p $port RL.PEEK user:42 free 0
  redis-cli -p $port RL.THROTTLE ip:10.0.0.1 15 30 60
  redis-cli -p $port INFO tollgate
  target/release/tollgate --url redis://127.0.0.1:$port usage user:42 free

The README has a five-minute tour; docs/commands.md has every command.
MSG
