#!/usr/bin/env bash
# `make run`: starts redis-server with the module on 127.0.0.1:PORT (state in .run/),
# loads the example plans and prints how to try it.
#   scripts/run.sh PORT MODULE     start (restarting the server it started before)
#   scripts/run.sh --stop          stop the server it started, whatever its port
# It only ever stops the server it started (pid and port remembered in .run/): a
# server it did not start on the port is left alone, with a message.
# TOLLGATE_RUN_DIR moves the state directory, TOLLGATE_CLI names the CLI (tests).
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${TOLLGATE_RUN_DIR:-$PWD/.run}
cli=${TOLLGATE_CLI:-target/release/tollgate}

answers() { redis-cli -p "$1" ping >/dev/null 2>&1; }

# The pid of the server this script started, if it is still running.
our_pid() {
    local pid
    [ -f "$dir/redis.pid" ] || return 1
    pid=$(cat "$dir/redis.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # A recycled pid belongs to another program: not ours.
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "server" || return 1
    echo "$pid"
}

our_port() { cat "$dir/port" 2>/dev/null || echo "?"; }

# Stops the server this script started; says what it stopped, or that none runs.
stop_ours() {
    local pid port
    if ! pid=$(our_pid); then
        rm -f "$dir/redis.pid"
        echo "no server started by make run is running (nothing to stop)"
        return 0
    fi
    port=$(our_port)
    kill "$pid"
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "the server on 127.0.0.1:$port (pid $pid) did not stop within 10 s" >&2
        return 1
    fi
    rm -f "$dir/redis.pid"
    echo "stopped the server make run started on 127.0.0.1:$port (pid $pid)"
}

if [ "${1:-}" = "--stop" ]; then
    stop_ours
    exit
fi

port=${1:?usage: run.sh PORT MODULE | run.sh --stop}
module=${2:?usage: run.sh PORT MODULE | run.sh --stop}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if pid=$(our_pid); then
    # One make run server at a time: they share the state directory.
    echo "restarting: $(stop_ours)"
fi
if answers "$port"; then
    cat >&2 <<MSG
A server that make run did not start already answers on 127.0.0.1:$port; leaving
it alone. Stop it yourself, or pick another port: make run PORT=$((port + 1))
MSG
    exit 1
fi
redis-server --port "$port" --bind 127.0.0.1 --daemonize yes \
    --dir "$dir" --logfile "$dir/redis.log" --pidfile "$dir/redis.pid" \
    --appendonly yes --appendfsync everysec \
    --loadmodule "$module"
echo "$port" >"$dir/port"
for _ in $(seq 1 50); do
    answers "$port" && break
    sleep 0.1
done
if ! answers "$port"; then
    echo "redis-server did not start; see $dir/redis.log" >&2
    tail -20 "$dir/redis.log" >&2
    exit 1
fi
"$cli" --url "redis://127.0.0.1:$port" plans apply examples/plans.json >/dev/null
# The hint shows a whole request: admit on the estimate under an id, settle on the
# actual cost (which frees the `jobs` lease), so it can be run again and again.
cat <<MSG

Tollgate is running on 127.0.0.1:$port (log: ${dir#"$PWD/"}/redis.log; stop it with: make stop).
Plans loaded: $(redis-cli -p "$port" RL.PLAN.LIST | tr '\n' ' ')

Try it:
  redis-cli -p $port RL.PLAN.GET free
  redis-cli -p $port RL.ACQUIRE user:42 free 1 COST token 500 ID req-1
  redis-cli -p $port RL.RELEASE user:42 req-1 COST token 120
  redis-cli -p $port RL.THROTTLE ip:10.0.0.1 15 30 60
  redis-cli -p $port INFO tollgate
  $cli --url redis://127.0.0.1:$port usage user:42 free

The README has a five-minute tour; docs/commands.md has every command.
MSG
