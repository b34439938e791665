#!/usr/bin/env bash
# `make bench-quick` / `make bench-load`: the service in release mode on a
# database of its own (with the development Redis and MongoDB), driven over
# gRPC by datagate-bench, with baselines measured in the same run (a bare
# tonic service, pgbench -S, redis-benchmark GET); results in
# bench/results/latest.json.
#
#   scripts/bench-load.sh quick    1 and 4 callers, 2 s per scenario
#   scripts/bench-load.sh full     1, 4 and 16 callers, 10 s per scenario
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
MODE=${1:-quick}
case "$MODE" in
  quick) CONCURRENCY=1,4; DURATION=2s; WARMUP=500ms; USERS=4000 ;;
  full) CONCURRENCY=1,4,16; DURATION=10s; WARMUP=2s; USERS=30000 ;;
  *) echo "usage: $0 quick|full" >&2; exit 2 ;;
esac
eval "$(scripts/dev-env.sh up)"

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
cargo build --release --quiet --bin datagate --bin datagate-bench
PSQL=$(command -v psql || ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -n 1)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

DB=datagate_load_$$
base=${DATABASE_URL%%\?*}
query=${DATABASE_URL#"$base"}
DB_URL="${base%/*}/$DB$query"
"$PSQL" "$DATABASE_URL" -qc "CREATE DATABASE $DB" >/dev/null
# pgbench's own database, for the PostgreSQL baseline.
"$PSQL" "$DATABASE_URL" -qc "CREATE DATABASE ${DB}_pgbench" >/dev/null
LOG=$(mktemp)
SERVER_PID=
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
  "$PSQL" "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  "$PSQL" "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS ${DB}_pgbench WITH (FORCE)" >/dev/null 2>&1 || true
  rm -f "$LOG"
}
trap cleanup EXIT

token_out=$("$TARGET/datagate" token new --caller bench --role admin)
TOKEN=$(sed -n 's/^token: *//p' <<<"$token_out")
ENTRY=$(sed -n 's/^config: DATAGATE__AUTH__TOKENS=//p' <<<"$token_out")
PORT=$(free_port)
DATAGATE__DATABASE__URL=$DB_URL "$TARGET/datagate" migrate up >/dev/null
DATAGATE__DATABASE__URL=$DB_URL \
DATAGATE__PAGINATION__TOKEN_SECRET=load-test-page-token-secret-0123456789 \
DATAGATE__AUTH__TOKENS=$ENTRY \
DATAGATE__REDIS__URL=$REDIS_URL DATAGATE__REDIS__KEY_PREFIX=$DB \
DATAGATE__MONGODB__URL=${MONGODB_URL:-} DATAGATE__MONGODB__DATABASE=$DB \
DATAGATE__TELEMETRY__LOG_FILTER=warn \
DATAGATE__SERVER__HOST=127.0.0.1 DATAGATE__SERVER__PORT=$PORT \
DATAGATE__METRICS__HOST=127.0.0.1 DATAGATE__METRICS__PORT=$(free_port) \
  "$TARGET/datagate" serve >"$LOG" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.2
done

# Baselines where the tools are installed (they are with the dev servers).
REDIS_HOSTPORT=${REDIS_URL#redis://}
REDIS_HOSTPORT=${REDIS_HOSTPORT%%/*}
export DATAGATE_BENCH_REDIS=$REDIS_HOSTPORT
command -v pgbench >/dev/null && export DATAGATE_BENCH_PGBENCH_URL="${base%/*}/${DB}_pgbench$query"
"$TARGET/datagate-bench" --addr "http://127.0.0.1:$PORT" --token "$TOKEN" \
  --concurrency "$CONCURRENCY" --duration "$DURATION" --warmup "$WARMUP" \
  --users "$USERS" --out bench/results
