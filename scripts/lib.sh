# Sourced (never run) by the scripts in scripts/ and by the Makefile: what
# they would otherwise each write again. Sourcing it sets ROOT (the
# repository) and STATE (the development state directory) and changes to
# ROOT; the functions return non-zero on failure, so that under `set -e`
# and in `a && b` chains alike a failure stops the caller.
#
#   . scripts/lib.sh
#   dev_env_up                  start the development servers, export their environment
#   need_psql                   set PSQL to a psql client
#   db_url NAME                 DATABASE_URL with its database replaced by NAME
#   free_port                   a free TCP port on loopback
#   drop_mongo_database URL NAME
#   need_tool COMMAND PACKAGE   install the Debian PACKAGE when COMMAND is missing

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${DATAGATE_DEV_DIR:-$ROOT/.dev}
cd "$ROOT" || return

# Starts (installing if missing) PostgreSQL, Redis and MongoDB, and exports
# DATABASE_URL, REDIS_URL, REDIS_CLUSTER_URLS, MONGODB_URL and PATH. The
# output is assigned before it is evaluated: `eval "$(scripts/dev-env.sh up)"`
# would hide a failing dev-env.sh behind a successful eval.
dev_env_up() {
  local exports
  exports=$("$ROOT/scripts/dev-env.sh" up) || return
  eval "$exports"
}

# PSQL: psql on PATH, else the newest PostgreSQL installation's.
need_psql() {
  PSQL=$(command -v psql || ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -n 1) || true
  [ -n "$PSQL" ] || { echo "no psql found (scripts/dev-env.sh up installs PostgreSQL)" >&2; return 1; }
}

# postgres://u@h:p/db?opts with the database replaced, the options kept.
db_url() {
  local base=${DATABASE_URL%%\?*}
  echo "${base%/*}/$1${DATABASE_URL#"$base"}"
}

need_tool() {
  command -v "$1" >/dev/null && return
  command -v apt-get >/dev/null || { echo "$1 is missing: install $2" >&2; return 1; }
  echo "installing $2 (for $1)" >&2
  local sudo=
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get install -y -qq "$2" >&2 2>/dev/null ||
    { $sudo apt-get update -qq >&2 && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >&2; }
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Drops the MongoDB database NAME on URL with pymongo (which the development
# venv has, beside nx-27017); says so, and succeeds, where pymongo is
# missing: a leftover database is not worth failing a run for.
drop_mongo_database() {
  python3 - "$1" "$2" <<'PY' || echo "could not drop MongoDB database $2 (no pymongo?)" >&2
import sys
try:
    import pymongo
except ImportError:
    sys.exit(1)
pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=5000).drop_database(sys.argv[2])
PY
}

# h2load_get_user PORT CALLS STREAMS TOKEN BODY: CALLS GetUser calls (BODY,
# a pre-encoded request) over one connection, STREAMS at a time; prints
# h2load's report. A gRPC error is an HTTP 200 too, trailers-only without a
# DATA frame: fewer messages back than calls means the calls failed, not
# that they were fast, and the report goes to stderr instead.
h2load_get_user() {
  local out data
  out=$(h2load -n "$2" -c 1 -m "$3" --header 'content-type: application/grpc' \
    --header 'te: trailers' --header "authorization: Bearer $4" -d "$5" \
    "http://127.0.0.1:$1/datagate.v1.UserService/GetUser")
  data=$(sed -n 's/^traffic:.* (\([0-9]*\)) data.*/\1/p' <<<"$out")
  if [ -z "$data" ] || [ "$data" -lt "$2" ]; then
    echo "h2load: GetUser calls to port $1 returned no messages:" >&2
    echo "$out" >&2
    return 1
  fi
  echo "$out"
}

# new_token BIN CALLER: a new admin token for CALLER from the `datagate`
# binary BIN: sets TOKEN (for the callers) and ENTRY (the server's
# DATAGATE__AUTH__TOKENS entry).
new_token() {
  local out
  out=$("$1" token new --caller "$2" --role admin)
  TOKEN=$(sed -n 's/^token: *//p' <<<"$out")
  ENTRY=$(sed -n 's/^config: DATAGATE__AUTH__TOKENS=//p' <<<"$out")
}

# wait_for_port PORT: until something listens on 127.0.0.1:PORT, for up to
# 20 s (what is started then answers, or its first call says why not).
wait_for_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.2
  done
}
