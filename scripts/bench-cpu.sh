#!/usr/bin/env bash
# `make bench-cpu`: CPU instructions per call (valgrind callgrind), which a
# busy shared machine does not change the way it changes times. The release
# service (cache on: GetUser is a Redis hit; cache off: a PostgreSQL read)
# and the reference servers of datagate-bench (one Redis GET, one
# primary-key SELECT per call) each run under callgrind in turn and get
# GetUser of one user from h2load, one call at a time. Each is dumped after
# FIRST calls (start-up, warm-up and pool set-up included) and again after
# SECOND more; the second dump over SECOND is the instructions per call,
# start-up cancelled. Prints the ratios and writes bench/results/cpu.md; the
# profiles stay in $CARGO_TARGET_DIR/callgrind/ for callgrind_annotate.
#
#   scripts/bench-cpu.sh [FIRST [SECOND]]     defaults 200 and 2000
#
# The service logs at warn, as in `make bench` (DATAGATE__TELEMETRY__LOG_FILTER
# overrides it), with admission control and deadlines on (the defaults).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
FIRST=${1:-200}
SECOND=${2:-2000}
OUT=bench/results
dev_env_up
need_tool valgrind valgrind
need_tool h2load nghttp2-client
need_psql

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
# The profiles of the measured calls, for callgrind_annotate (not committed).
PROFILES=${CARGO_TARGET_DIR:-$ROOT/target}/callgrind
echo "bench-cpu: building the release binaries" >&2
cargo build --release --quiet --bin datagate --bin datagate-bench

DB=datagate_cpu_$$
DB_URL=$(db_url "$DB")
WORK=$(mktemp -d)
PID=
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
  "$PSQL" "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
"$PSQL" "$DATABASE_URL" -qc "CREATE DATABASE $DB" >/dev/null
DATAGATE__DATABASE__URL=$DB_URL "$TARGET/datagate" migrate up >/dev/null
USER_ID=$("$PSQL" "$DB_URL" -tAc "INSERT INTO users (email, username, display_name, status) VALUES ('cpu@example.com', 'cpu', 'CPU bench', 'active') RETURNING id" | sed -n 1p)
"$TARGET/datagate-bench" --grpc-body-get-user "$USER_ID" >"$WORK/body.bin"
new_token "$TARGET/datagate" bench

calls() { # port n
  h2load_get_user "$1" "$2" 1 "$TOKEN" "$WORK/body.bin" >/dev/null
}

# measure NAME LAUNCHER ARGS...: runs LAUNCHER ARGS (a function below that
# execs its server under "${CALLGRIND[@]}", listening on $port), drives it,
# prints the instructions per call. The launcher execs, so $! is
# valgrind's pid, which callgrind_control needs.
measure() {
  local name=$1
  shift
  local file="$WORK/$name.callgrind"
  # Names uncompressed: the second dump, kept alone, then names its
  # functions itself (compressed, it would refer to names in the first).
  CALLGRIND=(valgrind --tool=callgrind --compress-strings=no --compress-pos=no
    --callgrind-out-file="$file")
  "$@" >"$WORK/$name.log" 2>&1 &
  PID=$!
  for _ in $(seq 1 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    kill -0 "$PID" 2>/dev/null || { cat "$WORK/$name.log" >&2; return 1; }
    sleep 0.5
  done
  calls "$port" "$FIRST"
  callgrind_control -d "$PID" >/dev/null
  calls "$port" "$SECOND"
  callgrind_control -d "$PID" >/dev/null
  kill "$PID" && wait "$PID" 2>/dev/null || true
  PID=
  # Dumps are numbered in order: .1 holds start-up and FIRST calls, .2 the
  # SECOND calls alone.
  local total
  total=$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$file.2")
  cp "$file.2" "$PROFILES/$name.callgrind"
  awk -v t="$total" -v n="$SECOND" 'BEGIN { printf "%.0f\n", t / n }'
}

service() { # port redis-url
  exec env DATAGATE__DATABASE__URL="$DB_URL" \
    DATAGATE__PAGINATION__TOKEN_SECRET=cpu-bench-page-token-secret-0123456789 \
    DATAGATE__AUTH__TOKENS="$ENTRY" DATAGATE__QUOTAS__ADMIN=0 \
    DATAGATE__REDIS__URL="$2" DATAGATE__REDIS__KEY_PREFIX="$DB" DATAGATE__MONGODB__URL= \
    DATAGATE__TELEMETRY__LOG_FILTER="${DATAGATE__TELEMETRY__LOG_FILTER:-warn}" \
    DATAGATE__SERVER__HOST=127.0.0.1 DATAGATE__SERVER__PORT="$1" \
    DATAGATE__METRICS__HOST=127.0.0.1 DATAGATE__METRICS__PORT="$(free_port)" \
    "${CALLGRIND[@]}" "$TARGET/datagate" serve
}
reference() { # kind port
  exec "${CALLGRIND[@]}" "$TARGET/datagate-bench" --serve-reference "$1" --listen "127.0.0.1:$2" \
    --database-url "$DB_URL" --redis-url "$REDIS_URL" --redis-key-prefix "$DB"
}

mkdir -p "$OUT" "$PROFILES"
echo "bench-cpu: callgrind, $FIRST then $SECOND calls each (a few minutes)" >&2
port=$(free_port); hit=$(measure service_hit service "$port" "$REDIS_URL")
# The service's hit filled the key the Redis reference reads.
port=$(free_port); get=$(measure reference_redis_get reference redis-get "$port")
port=$(free_port); uncached=$(measure service_uncached service "$port" "")
port=$(free_port); select=$(measure reference_select reference primary-key-select "$port")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }
{
  echo "Instructions per GetUser (callgrind, release build, 1 caller, the $SECOND calls after the first $FIRST):"
  echo
  echo "| call | service | reference | reference | ratio |"
  echo "|---|---:|---|---:|---:|"
  echo "| GetUser, Redis hit | $hit | one Redis GET | $get | $(ratio "$hit" "$get") |"
  echo "| GetUser, cache off | $uncached | one primary-key SELECT | $select | $(ratio "$uncached" "$select") |"
} | tee "$OUT/cpu.md"
echo "profiles: $PROFILES/*.callgrind (callgrind_annotate FILE)" >&2
