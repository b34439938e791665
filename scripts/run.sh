#!/usr/bin/env bash
# `make run`: start the databases, migrate and seed a development database,
# then run datagate in the foreground with a development token, after
# printing grpcurl commands to try.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
given_url=${DATABASE_URL:-}
dev_env_up

if [ -n "$given_url" ]; then
  DB_URL=$given_url                      # the caller's database, used as is
else
  need_psql
  if [ -z "$("$PSQL" "$DATABASE_URL" -tAc "SELECT 1 FROM pg_database WHERE datname = 'datagate_dev'")" ]; then
    "$PSQL" "$DATABASE_URL" -qc "CREATE DATABASE datagate_dev"
  fi
  DB_URL=$(db_url datagate_dev)
fi

cargo build --bin datagate
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/datagate

# A development token (admin role) and page-token secret, made once.
if [ ! -s "$STATE/dev-token" ]; then
  "$BIN" token new --caller dev --role admin >"$STATE/dev-token"
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/page-secret"
fi
TOKEN=$(sed -n 's/^token: *//p' "$STATE/dev-token")

export DATAGATE__DATABASE__URL=$DB_URL
export DATAGATE__REDIS__URL=${DATAGATE__REDIS__URL:-$REDIS_URL}
export DATAGATE__MONGODB__URL=${DATAGATE__MONGODB__URL:-$MONGODB_URL}
export DATAGATE__MONGODB__DATABASE=${DATAGATE__MONGODB__DATABASE:-datagate_dev}
export DATAGATE__AUTH__TOKENS=$(sed -n 's/^config: DATAGATE__AUTH__TOKENS=//p' "$STATE/dev-token")
export DATAGATE__PAGINATION__TOKEN_SECRET=$(cat "$STATE/page-secret")
export DATAGATE__TELEMETRY__LOG_FORMAT=${DATAGATE__TELEMETRY__LOG_FORMAT:-pretty}
export DATAGATE__SERVER__SHUTDOWN_READINESS_DELAY=${DATAGATE__SERVER__SHUTDOWN_READINESS_DELAY:-0s}

"$BIN" migrate up
"$BIN" seed
PORT=${DATAGATE__SERVER__PORT:-50051}
cat <<MSG

datagate is starting on localhost:$PORT (metrics: http://localhost:${DATAGATE__METRICS__PORT:-9090}/metrics)
grpcurl is in $STATE/venv/bin (export PATH="$STATE/venv/bin:\$PATH").

  export TOKEN=$TOKEN
  grpcurl -plaintext localhost:$PORT list
  grpcurl -plaintext localhost:$PORT grpc.health.v1.Health/Check
  grpcurl -plaintext -H "authorization: Bearer \$TOKEN" -d '{"page_size": 10}' localhost:$PORT datagate.v1.UserService/ListUsers
  grpcurl -plaintext -H "authorization: Bearer \$TOKEN" -d '{"id": 1}' localhost:$PORT datagate.v1.UserService/GetUser
  grpcurl -plaintext -H "authorization: Bearer \$TOKEN" -d '{"email": "ada@example.com", "password": "correct horse battery"}' localhost:$PORT datagate.v1.UserService/VerifyPassword
  grpcurl -plaintext -H "authorization: Bearer \$TOKEN" -d '{"email": "new@example.com", "username": "newbie"}' localhost:$PORT datagate.v1.UserService/CreateUser

Ctrl-C stops it gracefully.
MSG
exec "$BIN" serve
