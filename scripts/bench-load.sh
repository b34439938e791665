#!/usr/bin/env bash
# `make bench` / `make bench-quick`: the service in release mode on a
# database of its own (with the development Redis and MongoDB), driven over
# gRPC by datagate-bench, with baselines measured in the same run (a bare
# tonic service, pgbench -S, redis-benchmark GET) and reference servers
# (`datagate-bench --serve-reference`: one Redis GET, one primary-key
# SELECT, one json_agg statement per call), each in its own process beside
# a second service with its cache off. Writes latest.json, latest.md,
# latency.svg and throughput.svg; then h2load (an independent HTTP/2 client)
# drives GetUser against the service and the matching reference, and the
# ratios go to h2load.md.
#
#   scripts/bench-load.sh full     1, 4, 16 and 64 callers, 6 s per scenario, on a
#                                  copy of a generated dataset (200k products,
#                                  100k users, 200k orders, 300k searches);
#                                  results in bench/results/ (committed)
#   scripts/bench-load.sh quick    1 and 4 callers, 1 s per scenario, on an
#                                  empty database; results in bench/results/quick/
#   scripts/bench-load.sh points   the point reads and their references only
#                                  (GetUser hit, near, uncached) at 1, 16 and 64
#                                  callers, 4 s each, on an empty database, then
#                                  h2load; results in bench/results/points/ (a
#                                  few minutes: `make bench-points`, run it 3
#                                  times for the spread)
#
# SCENARIOS=a,b (datagate-bench's names) runs only those, each still after
# its reference; its results replace the mode's files, so copy them away
# first (BENCHMARKS.md's three ListUsersWithOrders runs:
# SCENARIOS=list_users_with_orders scripts/bench-load.sh full).
#
# The full suite generates its dataset into the template database
# datagate_bench_seed (again when it is over a week old) and copies it for
# every run (CREATE DATABASE ... TEMPLATE takes seconds), so each run starts
# from the same rows.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
MODE=${1:-quick}
case "$MODE" in
  quick) CONCURRENCY=1,4; DURATION=1s; WARMUP=300ms; USERS=6000; OUT=bench/results/quick; QUERY=widget; H2LOAD_N=5000 ;;
  full) CONCURRENCY=1,4,16,64; DURATION=6s; WARMUP=1s; USERS=3000; OUT=bench/results; QUERY="wireless speaker"; H2LOAD_N=40000 ;;
  points) CONCURRENCY=1,16,64; DURATION=4s; WARMUP=1s; USERS=3000; OUT=bench/results/points; QUERY=widget; H2LOAD_N=40000
    SCENARIOS=get_user_hit,get_user_near,get_user_uncached ;;
  *) echo "usage: $0 quick|full|points" >&2; exit 2 ;;
esac
dev_env_up
need_tool h2load nghttp2-client

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
echo "bench: building the release binaries" >&2
cargo build --release --quiet --bin datagate --bin datagate-bench
need_psql

DB=datagate_load_$$
DB_URL=$(db_url "$DB")
LOG=$(mktemp)
SERVER_PID=
PIDS=()
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
  "$PSQL" "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  "$PSQL" "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS ${DB}_pgbench WITH (FORCE)" >/dev/null 2>&1 || true
  [ -z "${MONGODB_URL:-}" ] || drop_mongo_database "$MONGODB_URL" "$DB"
  rm -f "$LOG"
}
trap cleanup EXIT
if [ "$MODE" = full ]; then
  SEED_DB=datagate_bench_seed
  # The generated rows are dated relative to the day they were made, and the
  # scenarios read recent windows (category_metrics: 90 days): a dataset
  # older than a week is made again, so that runs stay comparable.
  # Empty: no dataset; "unknown": one without its generation date.
  age=$("$PSQL" "$DATABASE_URL" -tAc "SELECT coalesce((current_date - substring(shobj_description(oid, 'pg_database') from 'generated ([0-9-]+)')::date)::text, 'unknown') FROM pg_database WHERE datname = '$SEED_DB'")
  if [ "$age" = unknown ] || { [ -n "$age" ] && [ "$age" -gt 7 ]; }; then
    echo "bench: $SEED_DB is $age days old; generating it again" >&2
    "$PSQL" "$DATABASE_URL" -qc "DROP DATABASE $SEED_DB WITH (FORCE)" >/dev/null
    age=
  fi
  if [ -z "$age" ]; then
    echo "bench: generating the dataset into $SEED_DB (once a week; runs copy it)" >&2
    # An interrupted generation leaves ${SEED_DB}_partial: it starts over.
    "$PSQL" "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS ${SEED_DB}_partial WITH (FORCE)" >/dev/null
    "$PSQL" "$DATABASE_URL" -qc "CREATE DATABASE ${SEED_DB}_partial" >/dev/null
    DATAGATE__DATABASE__URL=$(db_url "${SEED_DB}_partial") "$TARGET/datagate" migrate up >/dev/null
    DATAGATE__DATABASE__URL=$(db_url "${SEED_DB}_partial") "$TARGET/datagate" seed \
      --products 200000 --users 100000 --orders 200000 --searches 300000 --seed 42
    "$PSQL" "$DATABASE_URL" -qc "COMMENT ON DATABASE ${SEED_DB}_partial IS 'generated $(date -u +%F) by datagate seed --seed 42'" \
      -c "ALTER DATABASE ${SEED_DB}_partial RENAME TO $SEED_DB" >/dev/null
  fi
  "$PSQL" "$DATABASE_URL" -qc "CREATE DATABASE $DB TEMPLATE $SEED_DB" >/dev/null
else
  "$PSQL" "$DATABASE_URL" -qc "CREATE DATABASE $DB" >/dev/null
fi
# pgbench's own database, for the PostgreSQL baseline.
"$PSQL" "$DATABASE_URL" -qc "CREATE DATABASE ${DB}_pgbench" >/dev/null

new_token "$TARGET/datagate" bench
PORT=$(free_port)
DATAGATE__DATABASE__URL=$DB_URL "$TARGET/datagate" migrate up >/dev/null
DATAGATE__DATABASE__URL=$DB_URL \
DATAGATE__PAGINATION__TOKEN_SECRET=load-test-page-token-secret-0123456789 \
DATAGATE__AUTH__TOKENS=$ENTRY DATAGATE__QUOTAS__ADMIN=0 \
DATAGATE__REDIS__URL=$REDIS_URL DATAGATE__REDIS__KEY_PREFIX=$DB \
DATAGATE__MONGODB__URL=${MONGODB_URL:-} DATAGATE__MONGODB__DATABASE=$DB \
DATAGATE__TELEMETRY__LOG_FILTER=warn \
DATAGATE__SERVER__HOST=127.0.0.1 DATAGATE__SERVER__PORT=$PORT \
DATAGATE__METRICS__HOST=127.0.0.1 DATAGATE__METRICS__PORT=$(free_port) \
  "$TARGET/datagate" serve >"$LOG" 2>&1 &
SERVER_PID=$!
# The same service with its cache off (and no MongoDB, which GetUser does
# not use), for get_user_uncached.
UNCACHED_PORT=$(free_port)
DATAGATE__DATABASE__URL=$DB_URL \
DATAGATE__PAGINATION__TOKEN_SECRET=load-test-page-token-secret-0123456789 \
DATAGATE__AUTH__TOKENS=$ENTRY DATAGATE__QUOTAS__ADMIN=0 \
DATAGATE__REDIS__URL= DATAGATE__MONGODB__URL= \
DATAGATE__TELEMETRY__LOG_FILTER=warn \
DATAGATE__SERVER__HOST=127.0.0.1 DATAGATE__SERVER__PORT=$UNCACHED_PORT \
DATAGATE__METRICS__HOST=127.0.0.1 DATAGATE__METRICS__PORT=$(free_port) \
  "$TARGET/datagate" serve >>"$LOG" 2>&1 &
PIDS+=($!)
# The reference servers, each in a process of its own, with the service's
# pool sizes.
GET_PORT=$(free_port); SELECT_PORT=$(free_port); JSON_PORT=$(free_port)
reference() { # kind port
  "$TARGET/datagate-bench" --serve-reference "$1" --listen "127.0.0.1:$2" \
    --database-url "$DB_URL" --redis-url "$REDIS_URL" --redis-key-prefix "$DB" >>"$LOG" 2>&1 &
  PIDS+=($!)
}
reference redis-get "$GET_PORT"
reference primary-key-select "$SELECT_PORT"
reference json-agg "$JSON_PORT"
for port in "$PORT" "$UNCACHED_PORT" "$GET_PORT" "$SELECT_PORT" "$JSON_PORT"; do
  wait_for_port "$port"
done

# Baselines where the tools are installed (they are with the dev servers).
REDIS_HOSTPORT=${REDIS_URL#redis://}
REDIS_HOSTPORT=${REDIS_HOSTPORT%%/*}
export DATAGATE_BENCH_REDIS=$REDIS_HOSTPORT
command -v pgbench >/dev/null && export DATAGATE_BENCH_PGBENCH_URL=$(db_url "${DB}_pgbench")
"$TARGET/datagate-bench" --addr "http://127.0.0.1:$PORT" --token "$TOKEN" \
  --concurrency "$CONCURRENCY" --duration "$DURATION" --warmup "$WARMUP" \
  --users "$USERS" --query "$QUERY" --service-pid "$SERVER_PID" --out "$OUT" \
  --uncached-addr "http://127.0.0.1:$UNCACHED_PORT" \
  --reference-get "http://127.0.0.1:$GET_PORT" \
  --reference-select "http://127.0.0.1:$SELECT_PORT" \
  --reference-json-agg "http://127.0.0.1:$JSON_PORT" \
  ${SCENARIOS:+--scenarios "$SCENARIOS"}

# h2load: GetUser of one user (a Redis hit after the first call; with the
# cache off, a primary-key read every call), 16 streams on one connection,
# against the service and the matching reference, alternately.
USER_ID=$("$PSQL" "$DB_URL" -tAc "SELECT min(id) FROM users WHERE deleted_at IS NULL")
BODY=$(mktemp)
"$TARGET/datagate-bench" --grpc-body-get-user "$USER_ID" >"$BODY"
h2load_rps() { # port
  h2load_get_user "$1" "$H2LOAD_N" 16 "$TOKEN" "$BODY" |
    sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p'
}
{
  echo "h2load -n $H2LOAD_N -c 1 -m 16, GetUser of user $USER_ID; service and reference alternately."
  echo
  echo "| call | service req/s | reference | reference req/s | ratio |"
  echo "|---|---:|---|---:|---:|"
  for pair in "hit $PORT redis_get $GET_PORT" "uncached $UNCACHED_PORT select $SELECT_PORT"; do
    read -r call service_port ref ref_port <<<"$pair"
    h2load_rps "$service_port" >/dev/null # warm-up: fills the cache, opens the pools
    ref_rps=$(h2load_rps "$ref_port")
    service_rps=$(h2load_rps "$service_port")
    echo "| GetUser $call | $service_rps | $ref | $ref_rps | $(awk -v a="$service_rps" -v b="$ref_rps" 'BEGIN { printf "%.2fx", a / b }') |"
  done
} | tee "$OUT/h2load.md"
rm -f "$BODY"
