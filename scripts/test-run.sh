#!/usr/bin/env bash
# Tests `make run` / `make stop` (scripts/run.sh) and `make cluster`'s port variables
# (run by `make test`, after the debug build): the "try it" hint works however often
# it is run, `make stop` finds the server whatever its port and says what it stopped,
# and a server the script did not start is never stopped. Scratch ports and a scratch
# state directory: a real `make run` server is not touched.
set -uo pipefail
cd "$(dirname "$0")/.."

module=$PWD/target/debug/libtollgate.so
export TOLLGATE_CLI=$PWD/target/debug/tollgate
for f in "$module" "$TOLLGATE_CLI"; do
    [ -e "$f" ] || { echo "test-run: $f is missing: run make build first" >&2; exit 1; }
done
tmp=$(mktemp -d)
export TOLLGATE_RUN_DIR=$tmp/run
foreign_pid=
cleanup() {
    scripts/run.sh --stop >/dev/null 2>&1
    [ -n "$foreign_pid" ] && kill "$foreign_pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT

failures=0
cases=0
check() {
    local name=$1
    shift
    cases=$((cases + 1))
    if "$@"; then
        echo "ok   $name"
    else
        echo "FAIL $name"
        failures=$((failures + 1))
    fi
}
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
answers() { redis-cli -p "$1" ping >/dev/null 2>&1; }
matches() { [[ $1 =~ $2 ]]; }
# The value after `field` in a redis-cli (non-tty) reply to RL.ACQUIRE / RL.RELEASE.
field() { awk -v f="$1" 'prev == f { print; exit } { prev = $0 }'; }

port=$(free_port)
out=$(scripts/run.sh "$port" "$module" 2>&1)
check "run.sh starts a server on a scratch port" answers "$port"
mapfile -t hint < <(printf '%s\n' "$out" | sed -n 's/^  \(redis-cli .*\)$/\1/p')
mapfile -t cli_hint < <(printf '%s\n' "$out" | grep -F "  $TOLLGATE_CLI ")
check "the hint has commands to try" test "${#hint[@]}" -ge 4 -a "${#cli_hint[@]}" -ge 1

# Every hint command works, ten times over (the old hint was denied on its fifth
# run: each ACQUIRE took a lease it never released).
hint_ok=1
for round in $(seq 1 10); do
    for command in "${hint[@]}" "${cli_hint[@]}"; do
        reply=$(eval "$command" 2>&1) || { echo "  round $round: $command failed: $reply"; hint_ok=0; }
        case "$command" in
        *RL.ACQUIRE*)
            allowed=$(printf '%s\n' "$reply" | field allowed)
            [ "$allowed" = 1 ] || { echo "  round $round: $command: allowed=$allowed"; hint_ok=0; }
            ;;
        *RL.RELEASE*)
            released=$(printf '%s\n' "$reply" | field released)
            [ "$released" = 1 ] || { echo "  round $round: $command: released=$released"; hint_ok=0; }
            ;;
        esac
    done
done
check "every hint command works ten times in a row" test $hint_ok = 1
check "the hint leaves nothing held" \
    test "$(redis-cli -p "$port" INFO tollgate | tr -d '\r' | sed -n 's/^tollgate_requests_in_flight://p')" = 0

# make stop finds the server by itself, whatever PORT it was started with.
out=$(make --no-print-directory -s stop 2>&1)
check "make stop says what it stopped" \
    matches "$out" "^stopped the server make run started on 127\.0\.0\.1:$port \(pid [0-9]+\)$"
check "make stop stopped it" bash -c "! redis-cli -p $port ping >/dev/null 2>&1"
out=$(make --no-print-directory -s stop 2>&1)
check "make stop with nothing running says so" test "$out" = "no server started by make run is running (nothing to stop)"

# A second run on another port replaces the first (they share the state directory).
port2=$(free_port)
scripts/run.sh "$port" "$module" >/dev/null 2>&1
out=$(scripts/run.sh "$port2" "$module" 2>&1)
check "a run on another port restarts the first one" \
    matches "$out" "restarting: stopped the server make run started on 127\.0\.0\.1:$port "
check "...which no longer answers, the new one does" \
    bash -c "! redis-cli -p $port ping >/dev/null 2>&1 && redis-cli -p $port2 ping >/dev/null 2>&1"
scripts/run.sh --stop >/dev/null

# A server run.sh did not start is never stopped, by run or by stop.
foreign=$(free_port)
redis-server --port "$foreign" --bind 127.0.0.1 --save "" --daemonize yes \
    --pidfile "$tmp/foreign.pid" --logfile "$tmp/foreign.log" --dir "$tmp"
for _ in $(seq 1 50); do answers "$foreign" && break; sleep 0.1; done
foreign_pid=$(cat "$tmp/foreign.pid")
out=$(scripts/run.sh "$foreign" "$module" 2>&1)
status=$?
check "run.sh refuses a port another server holds" \
    matches "$status $out" "^1 .*did not start already answers on 127\.0\.0\.1:$foreign; leaving"
out=$(make --no-print-directory -s stop 2>&1)
check "make stop leaves the other server alone" answers "$foreign"
check "...and says nothing of its own runs" test "$out" = "no server started by make run is running (nothing to stop)"
kill "$foreign_pid"
foreign_pid=

# make cluster takes its ports from CLUSTER_PORT, or PORT given on the command line.
cluster_cmd() { make --no-print-directory -n cluster "$@" | grep -o 'cluster.sh start [0-9]*'; }
check "make cluster defaults to 7100" test "$(cluster_cmd)" = "cluster.sh start 7100"
check "make cluster CLUSTER_PORT=7300" test "$(cluster_cmd CLUSTER_PORT=7300)" = "cluster.sh start 7300"
check "make cluster PORT=7400" test "$(cluster_cmd PORT=7400)" = "cluster.sh start 7400"
check "make help lists PORT and CLUSTER_PORT" \
    matches "$(make --no-print-directory help)" $'\n  PORT=[0-9]+ .*\n  CLUSTER_PORT=[0-9]+ '

echo "run.sh: $((cases - failures))/$cases cases passed"
[ "$failures" -eq 0 ]
