#!/usr/bin/env bash
# `make bench-writes` (and the end of `make bench`): CreateOrder against
# PostgreSQL's own write benchmark, back to back on the same server at the
# same client count: pgbench TPC-B (`pgbench -M prepared`, five statements a
# transaction) on a database of its own, then datagate-bench's create_order
# (3 lines) against the release service on another; prints both and the
# ratio (target: CreateOrder >= 0.3 x TPC-B).
#
#   scripts/bench-writes.sh                    16 clients, 10 s each
#   CLIENTS=1,16 DURATION=10 scripts/bench-writes.sh
#   DATAGATE_BIN=/path/to/datagate scripts/bench-writes.sh   another build
#                                              (with datagate-bench beside it)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
CLIENTS=${CLIENTS:-16}
DURATION=${DURATION:-10}
dev_env_up
need_psql
command -v pgbench >/dev/null || { echo "bench-writes: pgbench is required" >&2; exit 1; }

if [ -n "${DATAGATE_BIN:-}" ]; then
  BIN_DIR=$(dirname "$DATAGATE_BIN")
else
  BIN_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/release
  echo "bench-writes: building the release binaries" >&2
  cargo build --release --quiet --bin datagate --bin datagate-bench
fi

DB=datagate_writes_$$
PGB=${DB}_pgbench
LOG=$(mktemp)
OUT=$(mktemp -d)
SERVER_PID=
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
  for db in "$DB" "$PGB"; do
    "$PSQL" "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  rm -rf "$LOG" "$OUT"
}
trap cleanup EXIT
"$PSQL" "$DATABASE_URL" -qc "CREATE DATABASE $DB" -c "CREATE DATABASE $PGB" >/dev/null

# 1. TPC-B, PostgreSQL's own limit for small write transactions here.
pgbench -i -q "$(db_url "$PGB")" >/dev/null 2>&1
declare -A TPS
for c in ${CLIENTS//,/ }; do
  j=$(( c < 2 ? c : 2 ))
  TPS[$c]=$(pgbench -M prepared -c "$c" -j "$j" -T "$DURATION" "$(db_url "$PGB")" 2>/dev/null \
    | sed -n 's/^tps = \([0-9.]*\) .*/\1/p')
  echo "pgbench TPC-B (-M prepared) x$c: ${TPS[$c]} tps" >&2
done

# 2. CreateOrder through the service (its cache on, as in `make bench`).
new_token "$BIN_DIR/datagate" bench
PORT=$(free_port)
DATAGATE__DATABASE__URL=$(db_url "$DB") "$BIN_DIR/datagate" migrate up >/dev/null
DATAGATE__DATABASE__URL=$(db_url "$DB") \
DATAGATE__PAGINATION__TOKEN_SECRET=load-test-page-token-secret-0123456789 \
DATAGATE__AUTH__TOKENS=$ENTRY DATAGATE__QUOTAS__ADMIN=0 \
DATAGATE__REDIS__URL=$REDIS_URL DATAGATE__REDIS__KEY_PREFIX=$DB \
DATAGATE__TELEMETRY__LOG_FILTER=warn \
DATAGATE__SERVER__HOST=127.0.0.1 DATAGATE__SERVER__PORT=$PORT \
DATAGATE__METRICS__HOST=127.0.0.1 DATAGATE__METRICS__PORT=$(free_port) \
  "$BIN_DIR/datagate" serve >"$LOG" 2>&1 &
SERVER_PID=$!
wait_for_port "$PORT"
"$BIN_DIR/datagate-bench" --addr "http://127.0.0.1:$PORT" --token "$TOKEN" \
  --scenarios create_order --concurrency "$CLIENTS" --duration "${DURATION}s" --warmup 2s \
  --users 100 --cold-users 100 --no-baselines --out "$OUT" >&2

echo
echo "| clients | pgbench TPC-B tps | CreateOrder rps | ratio (target 0.3, moonshot 0.4) |"
echo "|---:|---:|---:|---:|"
for c in ${CLIENTS//,/ }; do
  rps=$(jq -r --argjson c "$c" '.results[] | select(.scenario == "create_order" and .concurrency == $c) | .rps' "$OUT/latest.json")
  ratio=$(python3 -c "print(f'{$rps / ${TPS[$c]}:.2f}')")
  printf '| %s | %.0f | %.0f | %s |\n' "$c" "${TPS[$c]}" "$rps" "$ratio"
done
