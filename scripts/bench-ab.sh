#!/usr/bin/env bash
# `make bench-ab BASE=...`: one call against two builds of the service in the
# same run, alternately: A, this tree's release build, and B, the `datagate`
# binary at BASE (a build of another commit, e.g.
#   git worktree add /tmp/base COMMIT
#   CARGO_TARGET_DIR=/tmp/base-target cargo build --release --bin datagate
# ); give it a target directory of its own: one whose files are hard links
# to this tree's shares the build script output, which that build rewrites
# in place. Each build gets a database of its own, migrated by that build,
# with the same user in it, and runs as in `make bench` (log filter warn,
# admission control and deadlines on, no MongoDB). h2load drives GetUser of
# that user over one connection at each stream count of STREAMS, ROUNDS
# times, A then B, after a warm-up of each; prints requests per second and
# the mean time per request of both builds, and A over B of each.
#
#   BASE=/tmp/base-target/release/datagate scripts/bench-ab.sh
#   CACHE=on (Redis hits; default off: a PostgreSQL read per call)
#   STREAMS=1,64   ROUNDS=3   CALLS=10000 (per round and stream count)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
BASE=${BASE:?set BASE to the datagate binary to compare against}
[ -x "$BASE" ] || { echo "bench-ab: $BASE is not an executable" >&2; exit 2; }
CACHE=${CACHE:-off}
STREAMS=${STREAMS:-1,64}
ROUNDS=${ROUNDS:-3}
CALLS=${CALLS:-10000}
dev_env_up
need_tool h2load nghttp2-client
need_psql

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
echo "bench-ab: building the release binaries" >&2
cargo build --release --quiet --bin datagate --bin datagate-bench
A=$TARGET/datagate

WORK=$(mktemp -d)
PIDS=()
DBS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
  for db in "${DBS[@]}"; do
    "$PSQL" "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

new_token "$A" bench
redis_url=
[ "$CACHE" = on ] && redis_url=$REDIS_URL

# Runs build `bin` as `name` (in this shell, so that cleanup sees its pid
# and database); its port goes to $WORK/name.port, its request body (GetUser
# of its user) to $WORK/name.body.
serve() { # binary name
  local bin=$1 name=$2 db=datagate_ab_$2_$$ port user
  DBS+=("$db")
  "$PSQL" "$DATABASE_URL" -qc "CREATE DATABASE $db" >/dev/null
  DATAGATE__DATABASE__URL=$(db_url "$db") "$bin" migrate up >/dev/null
  user=$("$PSQL" "$(db_url "$db")" -tAc "INSERT INTO users (email, username, display_name, status) VALUES ('ab@example.com', 'abbench', 'A/B bench', 'active') RETURNING id" | sed -n 1p)
  [ -n "$user" ] || { echo "bench-ab: no user in $db" >&2; exit 1; }
  port=$(free_port)
  DATAGATE__DATABASE__URL=$(db_url "$db") \
  DATAGATE__PAGINATION__TOKEN_SECRET=load-test-page-token-secret-0123456789 \
  DATAGATE__AUTH__TOKENS=$ENTRY DATAGATE__QUOTAS__ADMIN=0 \
  DATAGATE__REDIS__URL=$redis_url DATAGATE__REDIS__KEY_PREFIX=$db DATAGATE__MONGODB__URL= \
  DATAGATE__TELEMETRY__LOG_FILTER=warn \
  DATAGATE__SERVER__HOST=127.0.0.1 DATAGATE__SERVER__PORT=$port \
  DATAGATE__METRICS__HOST=127.0.0.1 DATAGATE__METRICS__PORT=$(free_port) \
    "$bin" serve >>"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  wait_for_port "$port"
  "$TARGET/datagate-bench" --grpc-body-get-user "$user" >"$WORK/$name.body"
  echo "$port" >"$WORK/$name.port"
}
serve "$A" a
serve "$BASE" b

# "rps mean_ms" of CALLS GetUser calls at $2 streams against build $1.
run() { # name streams
  local port out
  port=$(cat "$WORK/$1.port")
  out=$(h2load_get_user "$port" "$CALLS" "$2" "$TOKEN" "$WORK/$1.body") || {
    cat "$WORK/$1.log" >&2
    return 1
  }
  awk '/^finished in/ { sub(/,/, "", $4); rps = $4 }
       /^time for request:/ {
         v = $6; ms = v + 0
         if (v ~ /us$/) ms /= 1000; else if (v ~ /ms$/) ms += 0; else if (v ~ /s$/) ms *= 1000
       }
       END { printf "%s %.3f\n", rps, ms }' <<<"$out"
}

echo "GetUser, cache $CACHE, h2load -n $CALLS -c 1; A: $A; B: $BASE; $ROUNDS rounds, A then B."
echo
echo "| streams | round | A req/s | B req/s | A/B req/s | A mean ms | B mean ms | A/B mean |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
for streams in ${STREAMS//,/ }; do
  run a "$streams" >/dev/null # warm-up: pools opened, statements prepared
  run b "$streams" >/dev/null
  for round in $(seq 1 "$ROUNDS"); do
    read -r a_rps a_ms <<<"$(run a "$streams")"
    read -r b_rps b_ms <<<"$(run b "$streams")"
    awk -v s="$streams" -v r="$round" -v ar="$a_rps" -v br="$b_rps" -v am="$a_ms" -v bm="$b_ms" \
      'BEGIN { printf "| %d | %d | %.0f | %.0f | %.2fx | %.3f | %.3f | %.2fx |\n", s, r, ar, br, ar / br, am, bm, am / bm }'
  done
done
