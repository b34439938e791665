#!/usr/bin/env bash
# grpcurl smoke test: the built binary, called as a user would call it.
# Lists services by reflection, checks health, creates and reads a user,
# checks that a call without a token is refused, and that SIGTERM exits 0.
# Expects the environment of `scripts/dev-env.sh up` (make test provides it).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
: "${DATABASE_URL:?run through make test, or export the output of scripts/dev-env.sh up}"

BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/datagate
cargo build --quiet --bin datagate
need_psql
PYTHON=$(command -v python3)

passed=0
failed=0
check() { # description, command...
  local what=$1; shift
  if "$@"; then passed=$((passed + 1)); echo "smoke: ok    $what"
  else failed=$((failed + 1)); echo "smoke: FAIL  $what"; fi
}

DB=datagate_smoke_$$
DB_URL=$(db_url "$DB")
"$PSQL" "$DATABASE_URL" -qc "CREATE DATABASE $DB" >/dev/null
LOG=$(mktemp)
SERVER_PID=
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
  "$PSQL" "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  # The server is stopped by now (SIGTERM above, or the kill before).
  [ -z "${MONGODB_URL:-}" ] || drop_mongo_database "$MONGODB_URL" "$DB"
  rm -f "$LOG"
}
trap cleanup EXIT

PORT=$(free_port)
ADDR=127.0.0.1:$PORT
new_token "$BIN" smoke

export DATAGATE__DATABASE__URL=$DB_URL
DATAGATE__DATABASE__URL=$DB_URL "$BIN" migrate up >/dev/null
DATAGATE__PAGINATION__TOKEN_SECRET=smoke-test-page-token-secret-0123456789 \
DATAGATE__AUTH__TOKENS=$ENTRY \
DATAGATE__MONGODB__URL=${MONGODB_URL:-} DATAGATE__MONGODB__DATABASE=$DB \
DATAGATE__SERVER__HOST=127.0.0.1 DATAGATE__SERVER__PORT=$PORT \
DATAGATE__METRICS__HOST=127.0.0.1 DATAGATE__METRICS__PORT=$(free_port) \
  "$BIN" serve >"$LOG" 2>&1 &
SERVER_PID=$!

for _ in $(seq 1 100); do
  grpcurl -plaintext "$ADDR" grpc.health.v1.Health/Check >/dev/null 2>&1 && break
  sleep 0.2
done

services=$(grpcurl -plaintext "$ADDR" list)
for svc in datagate.v1.UserService datagate.v1.CatalogService datagate.v1.OrderService datagate.v1.AdminService datagate.v1.AnalyticsService grpc.health.v1.Health \
           grpc.reflection.v1.ServerReflection grpc.reflection.v1alpha.ServerReflection; do
  check "reflection lists $svc" grep -qx "$svc" <<<"$services"
done
check "describe shows the RPCs" grep -q "rpc CreateUser" <<<"$(grpcurl -plaintext "$ADDR" describe datagate.v1.UserService)"
check "health is SERVING" grep -q '"status": "SERVING"' <<<"$(grpcurl -plaintext "$ADDR" grpc.health.v1.Health/Check)"
check "UserService health is SERVING" grep -q '"status": "SERVING"' \
  <<<"$(grpcurl -plaintext -d '{"service":"datagate.v1.UserService"}' "$ADDR" grpc.health.v1.Health/Check)"

created=$(grpcurl -plaintext -H "authorization: Bearer $TOKEN" \
  -d '{"email":"smoke@example.com","username":"smoke","display_name":"Smoke Test","password":"correct horse battery"}' \
  "$ADDR" datagate.v1.UserService/CreateUser)
ID=$("$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["id"])' <<<"$created")
check "CreateUser returns the user" grep -q '"email": "smoke@example.com"' <<<"$created"
fetched=$(grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d "{\"id\": $ID}" "$ADDR" datagate.v1.UserService/GetUser)
check "GetUser returns it" grep -q '"username": "smoke"' <<<"$fetched"
verified=$(grpcurl -plaintext -H "authorization: Bearer $TOKEN" \
  -d '{"email":"smoke@example.com","password":"correct horse battery"}' "$ADDR" datagate.v1.UserService/VerifyPassword)
check "VerifyPassword accepts the password" grep -q '"valid": true' <<<"$verified"
check "the password never comes back" bash -c '! grep -q "correct horse" <<<"$1"' _ "$created$fetched$verified"
missing=$(grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{"id": 999999}' "$ADDR" datagate.v1.UserService/GetUser 2>&1 || true)
check "an unknown user is NotFound" grep -q "Code: NotFound" <<<"$missing"
check "error details decode by reflection" grep -q '"reason":"USER_NOT_FOUND"' <<<"$missing"
unauth=$(grpcurl -plaintext -d "{\"id\": $ID}" "$ADDR" datagate.v1.UserService/GetUser 2>&1 || true)
check "a call without a token is Unauthenticated" grep -q "Code: Unauthenticated" <<<"$unauth"

if [ -n "${MONGODB_URL:-}" ]; then
  profile=$(grpcurl -plaintext -H "authorization: Bearer $TOKEN" \
    -d "{\"user_id\": $ID, \"profile\": {\"given_name\": \"Smoke\", \"addresses\": [{\"label\": \"home\", \"line1\": \"1 Main St\", \"city\": \"Lisbon\", \"postal_code\": \"1100\", \"country\": \"PT\", \"primary\": true}]}, \"update_mask\": {\"paths\": [\"given_name\", \"addresses\"]}}" \
    "$ADDR" datagate.v1.UserService/UpdateUserProfile 2>&1 || true)
  check "UpdateUserProfile stores the profile in MongoDB" grep -q '"givenName": "Smoke"' <<<"$profile"
fi
grpcurl -plaintext -H "authorization: Bearer $TOKEN" \
  -d '{"sku":"SMOKE-1","title":"Smoke detector","category":"safety","price_cents":1999,"inventory":3}' \
  "$ADDR" datagate.v1.CatalogService/CreateProduct >/dev/null
found=$(grpcurl -plaintext -H "authorization: Bearer $TOKEN" \
  -d '{"query":"smoke detectors","sort":"PRODUCT_SORT_PRICE_ASCENDING"}' "$ADDR" datagate.v1.CatalogService/SearchProducts)
check "SearchProducts finds the product (stemmed)" grep -q '"sku": "SMOKE-1"' <<<"$found"
inverted=$(grpcurl -plaintext -H "authorization: Bearer $TOKEN" \
  -d '{"query":"smoke","min_price_cents":500,"max_price_cents":100}' "$ADDR" datagate.v1.CatalogService/SearchProducts 2>&1 || true)
check "an inverted price range is InvalidArgument" grep -q '"field":"max_price_cents"' <<<"$inverted"
sleep 1.5 # the search log is written in batches, at least every second
window="{\"start_time\":\"$(date -u -d '-1 hour' +%FT%TZ)\",\"end_time\":\"$(date -u -d '+1 hour' +%FT%TZ)\"}"
insights=$(grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d "$window" "$ADDR" datagate.v1.AnalyticsService/GetSearchInsights)
check "GetSearchInsights counts the search" grep -q '"query": "smoke detectors"' <<<"$insights"

kill -TERM "$SERVER_PID"
status=0
wait "$SERVER_PID" || status=$?
SERVER_PID=
check "SIGTERM exits 0" test "$status" -eq 0
check "logs are JSON with the caller" grep -q '"caller":"smoke"' "$LOG"

echo "smoke: $passed passed, $failed failed"
[ "$failed" -eq 0 ] || { echo "--- server log"; cat "$LOG"; exit 1; }
