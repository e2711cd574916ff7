#!/usr/bin/env bash
# Throwaway PostgreSQL server on loopback, for tests and benchmarks.
#
# Usage: deploy/local/postgres.sh {start|stop|status}
#
#   start   initdb on first use, start the server (idempotent), wait until it accepts
#           connections, print one line: the SQLAlchemy URL
#           postgresql+asyncpg://flywheel:flywheel@127.0.0.1:PORT/postgres
#   stop    fast shutdown; no-op when not running
#   status  print the URL and exit 0 when running; exit 3 when not running
#
# Environment:
#   PG_DIR   state directory (default: $REPO/.flywheel/local/postgres). Layout:
#              $PG_DIR/data          the cluster (PGDATA)
#              $PG_DIR/port          the port, reused by later starts
#              $PG_DIR/postgres.log  server log
#   PG_PORT  port to listen on (default: the recorded port, else a free one)
#
# The server listens on 127.0.0.1 only (no Unix socket), trusts loopback connections,
# and has a superuser flywheel/flywheel. fsync stays on. When run as root the server
# runs as the `postgres` OS user (PostgreSQL refuses to run as root).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
PG_DIR="${PG_DIR:-$REPO_ROOT/.flywheel/local/postgres}"
DATA="$PG_DIR/data"
PORT_FILE="$PG_DIR/port"
LOG_FILE="$PG_DIR/postgres.log"
PG_USER=flywheel
PG_PASSWORD=flywheel

die() {
  echo "postgres.sh: $*" >&2
  exit 1
}

find_bindir() {
  local d
  if command -v pg_config >/dev/null 2>&1; then
    d="$(pg_config --bindir 2>/dev/null || true)"
    if [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
      echo "$d"
      return 0
    fi
  fi
  # Highest installed major version first.
  local best="" v bestv=0
  for d in /usr/lib/postgresql/*/bin; do
    v="${d#/usr/lib/postgresql/}"
    v="${v%%/*}"
    if [[ "$v" =~ ^[0-9]+$ && -x "$d/initdb" && -x "$d/pg_ctl" ]] && ((v > bestv)); then
      best="$d"
      bestv="$v"
    fi
  done
  if [[ -n "$best" ]]; then
    echo "$best"
    return 0
  fi
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
    return 0
  fi
  return 1
}

BINDIR="$(find_bindir)" || die "PostgreSQL server binaries not found; run deploy/local/install.sh"

# Run a command as the postgres OS user when we are root, else directly.
as_pg() {
  if [[ "$(id -u)" -eq 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# Something listens on the port (TIME_WAIT leftovers of our own server do not count:
# the servers bind with SO_REUSEADDR).
port_listening() {
  local p="$1"
  if command -v ss >/dev/null 2>&1; then
    [[ -n "$(ss -Htln "sport = :$p" 2>/dev/null)" ]] && return 0
  fi
  (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null
}

# Any socket at all uses the port: for picking fresh ports.
port_in_use() {
  local p="$1"
  if command -v ss >/dev/null 2>&1; then
    [[ -n "$(ss -Htan "sport = :$p" 2>/dev/null)" ]] && return 0
  fi
  port_listening "$p"
}

# A free loopback port below the ephemeral range (32768+), so outgoing
# connections never hold it.
free_port() {
  local p i
  for ((i = 0; i < 500; i++)); do
    p=$((20000 + RANDOM % 12700))
    if ! port_in_use "$p"; then
      echo "$p"
      return 0
    fi
  done
  die "no free port found"
}

url_for() {
  echo "postgresql+asyncpg://$PG_USER:$PG_PASSWORD@127.0.0.1:$1/postgres"
}

is_running() {
  [[ -f "$DATA/PG_VERSION" ]] || return 1
  as_pg "$BINDIR/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

recorded_port() {
  [[ -s "$PORT_FILE" ]] && tr -d '[:space:]' <"$PORT_FILE"
}

# The postgres user must be able to reach $PG_DIR: make non-traversable parents
# (e.g. pytest's 0700 temp dirs) traversable for others.
prepare_dir() {
  mkdir -p "$PG_DIR"
  if [[ "$(id -u)" -ne 0 ]]; then
    return 0
  fi
  chown postgres:postgres "$PG_DIR"
  if ! runuser -u postgres -- test -x "$PG_DIR" -a -w "$PG_DIR"; then
    local d="$PG_DIR"
    while [[ "$d" != "/" ]]; do
      d="$(dirname "$d")"
      if ! runuser -u postgres -- test -x "$d"; then
        chmod o+x "$d"
      fi
    done
    runuser -u postgres -- test -x "$PG_DIR" -a -w "$PG_DIR" \
      || die "user postgres cannot write $PG_DIR"
  fi
  if [[ -e "$DATA" ]]; then
    chown -R postgres:postgres "$DATA"
  fi
  touch "$LOG_FILE"
  chown postgres:postgres "$LOG_FILE"
}

init_cluster() {
  [[ -f "$DATA/PG_VERSION" ]] && return 0
  rm -rf "$DATA"
  local pwfile="$PG_DIR/.pwfile"
  echo "$PG_PASSWORD" >"$pwfile"
  [[ "$(id -u)" -eq 0 ]] && chown postgres:postgres "$pwfile"
  # --no-sync only skips flushing the freshly created files once; the server itself
  # runs with fsync on.
  if ! as_pg "$BINDIR/initdb" -D "$DATA" -U "$PG_USER" --pwfile="$pwfile" \
    --auth-local=trust --auth-host=trust -E UTF8 --locale=C.UTF-8 \
    --no-sync --no-instructions >"$PG_DIR/initdb.log" 2>&1; then
    rm -f "$pwfile"
    cat "$PG_DIR/initdb.log" >&2
    die "initdb failed"
  fi
  rm -f "$pwfile"
  cat >>"$DATA/postgresql.conf" <<'EOF'

# --- deploy/local/postgres.sh: throwaway test server on loopback ---
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 200
shared_buffers = 128MB
work_mem = 8MB
maintenance_work_mem = 64MB
fsync = on
synchronous_commit = on
full_page_writes = on
max_wal_size = 1GB
timezone = 'UTC'
log_timezone = 'UTC'
logging_collector = off
log_min_messages = warning
log_line_prefix = '%m [%p] %q%u@%d '
EOF
}

cmd_start() {
  local port tries=0
  if is_running; then
    port="$(recorded_port)" || die "server running but $PORT_FILE is missing"
    url_for "$port"
    return 0
  fi
  prepare_dir
  init_cluster
  port="${PG_PORT:-}"
  if [[ -n "$port" ]] && port_listening "$port"; then
    die "PG_PORT $port is already in use"
  fi
  if [[ -z "$port" ]]; then
    port="$(recorded_port || true)"
    if [[ -n "$port" ]] && port_listening "$port"; then
      port=""
    fi
    [[ -n "$port" ]] || port="$(free_port)"
  fi
  while :; do
    echo "$port" >"$PORT_FILE"
    echo "--- postgres.sh start port=$port $(date -u +%FT%TZ)" >>"$LOG_FILE"
    if as_pg "$BINDIR/pg_ctl" -D "$DATA" -l "$LOG_FILE" -o "-p $port" -w -t 60 start \
      >/dev/null 2>&1; then
      break
    fi
    tries=$((tries + 1))
    # Lost a race for an auto-picked port: pick another.
    if [[ -z "${PG_PORT:-}" && $tries -lt 3 ]] && tail -n 20 "$LOG_FILE" | grep -q "Address already in use"; then
      port="$(free_port)"
      continue
    fi
    tail -n 40 "$LOG_FILE" >&2
    die "server failed to start (log: $LOG_FILE)"
  done
  local i
  for ((i = 0; i < 300; i++)); do
    if "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$port" -U "$PG_USER" -d postgres; then
      url_for "$port"
      return 0
    fi
    sleep 0.1
  done
  tail -n 40 "$LOG_FILE" >&2
  die "server started but is not accepting connections on 127.0.0.1:$port"
}

cmd_stop() {
  if ! is_running; then
    return 0
  fi
  as_pg "$BINDIR/pg_ctl" -D "$DATA" -m fast -w -t 120 stop >/dev/null \
    || die "pg_ctl stop failed (log: $LOG_FILE)"
}

cmd_status() {
  if is_running; then
    url_for "$(recorded_port)"
    return 0
  fi
  echo "stopped" >&2
  return 3
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 {start|stop|status}" >&2
    exit 2
    ;;
esac
