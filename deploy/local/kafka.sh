#!/usr/bin/env bash
# Single-node Apache Kafka (KRaft, broker+controller in one JVM) on loopback, for tests
# and benchmarks.
#
# Usage: deploy/local/kafka.sh {fetch|start|stop|status}
#
#   fetch   resolve the Kafka jars from Maven Central into deploy/local/.kafka/libs
#           (mvn, deploy/local/kafka-pom.xml); no-op when already there
#   start   format the storage on first use, start the broker in the background
#           (idempotent), wait until it serves metadata, print one line: the bootstrap
#           address 127.0.0.1:PORT
#   stop    SIGTERM, wait for a clean exit (SIGKILL after KAFKA_STOP_TIMEOUT seconds);
#           no-op when not running
#   status  print the bootstrap address and exit 0 when running; exit 3 when not
#
# Environment:
#   KAFKA_DIR             state directory (default: $REPO/.flywheel/local/kafka). Layout:
#                           data/              log dirs + KRaft metadata (kept by restarts)
#                           server.properties  generated on every start
#                           log4j2.properties  generated on every start
#                           server.log         broker log (stdout+stderr of the JVM)
#                           kafka.pid, port, controller_port
#   KAFKA_PORT            client (PLAINTEXT) port (default: the recorded one, else free)
#   KAFKA_CONTROLLER_PORT controller port (default: the recorded one, else free)
#   KAFKA_HEAP_OPTS       default -Xms256m -Xmx512m
#   KAFKA_JVM_OPTS        extra JVM flags, appended last
#   KAFKA_START_TIMEOUT   seconds to wait for readiness (default 120)
#   KAFKA_STOP_TIMEOUT    seconds to wait for a clean exit before SIGKILL (default 60)
#
# Restarting with the same KAFKA_DIR keeps topics, committed records and consumer group
# offsets, and reuses the same ports.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
POM="$SCRIPT_DIR/kafka-pom.xml"
LIBS="$SCRIPT_DIR/.kafka/libs"
KAFKA_DIR="${KAFKA_DIR:-$REPO_ROOT/.flywheel/local/kafka}"
DATA="$KAFKA_DIR/data"
PID_FILE="$KAFKA_DIR/kafka.pid"
PORT_FILE="$KAFKA_DIR/port"
CPORT_FILE="$KAFKA_DIR/controller_port"
LOG_FILE="$KAFKA_DIR/server.log"
PROPS="$KAFKA_DIR/server.properties"
LOG4J="$KAFKA_DIR/log4j2.properties"
MAIN_CLASS=kafka.Kafka
READY_LINE="Kafka Server started"

die() {
  echo "kafka.sh: $*" >&2
  exit 1
}

# ---------------------------------------------------------------------------- fetch

libs_present() {
  compgen -G "$LIBS/kafka_2.13-*.jar" >/dev/null \
    && compgen -G "$LIBS/kafka-clients-*.jar" >/dev/null \
    && compgen -G "$LIBS/log4j-slf4j-impl-*.jar" >/dev/null
}

cmd_fetch() {
  if libs_present; then
    return 0
  fi
  command -v mvn >/dev/null 2>&1 || die "mvn not found; run deploy/local/install.sh"
  local tmp="$SCRIPT_DIR/.kafka/libs.tmp"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  if ! mvn -B -q -f "$POM" -Dkafka.libs="$tmp" dependency:copy-dependencies >"$SCRIPT_DIR/.kafka/fetch.log" 2>&1; then
    cat "$SCRIPT_DIR/.kafka/fetch.log" >&2
    die "mvn dependency:copy-dependencies failed"
  fi
  rm -rf "$LIBS"
  rm -f "$SCRIPT_DIR"/.kafka/broker-*.jsa
  mv "$tmp" "$LIBS"
}

# ---------------------------------------------------------------------------- helpers

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
    if ! port_in_use "$p" && [[ "$p" != "${1:-}" ]]; then
      echo "$p"
      return 0
    fi
  done
  die "no free port found"
}

# Alive and not a zombie (an exited child not yet reaped still answers kill -0).
alive() {
  local st
  st="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  st="${st##*) }" # after "PID (comm) "
  st="${st%% *}"
  [[ -n "$st" && "$st" != Z && "$st" != X ]]
}

read_file() {
  [[ -s "$1" ]] && tr -d '[:space:]' <"$1"
}

# PID of the broker of this KAFKA_DIR, if it is alive.
running_pid() {
  local pid
  pid="$(read_file "$PID_FILE")" || return 1
  [[ -n "$pid" ]] && alive "$pid" || return 1
  # Guard against PID reuse: it must be our JVM with our server.properties.
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$MAIN_CLASS $PROPS" || return 1
  echo "$pid"
}

# Kafka cluster ids are 16 random bytes in unpadded base64url; avoid a leading '-',
# which the CLI would parse as an option.
new_cluster_id() {
  local id
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    [[ "$id" != -* ]] && break
  done
  echo "$id"
}

JAVA_BIN="java"
if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
  JAVA_BIN="$JAVA_HOME/bin/java"
fi

# Class-data-sharing archive of the broker's classes (AppCDS), specific to this JVM
# build and this libs dir. The first broker started without one dumps it when it
# exits cleanly (kafka.sh stop); later starts map it, which roughly halves startup.
cds_archive() {
  local java_real key
  java_real="$(readlink -f "$(command -v "$JAVA_BIN")")"
  key="$(echo "$java_real $(stat -c %Y "$java_real")" | cksum | cut -d' ' -f1)"
  echo "$SCRIPT_DIR/.kafka/broker-$key.jsa"
}

# Flags chosen for fast startup on a small box without costing peak throughput:
# serial GC, AppCDS (see cds_archive). For even faster starts at the price of
# throughput add -XX:TieredStopAtLevel=1 through KAFKA_JVM_OPTS.
jvm_opts() {
  # shellcheck disable=SC2206
  local heap=(${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m})
  # shellcheck disable=SC2206
  local extra=(${KAFKA_JVM_OPTS:-})
  JVM_OPTS=(
    "${heap[@]}"
    -XX:+UseSerialGC
    -Xshare:auto
    -XX:-UsePerfData
    -Djava.awt.headless=true
    -Dlog4j2.configurationFile="file:$LOG4J"
    -Dlog4j2.disable.jmx=true
    -Dkafka.logs.dir="$KAFKA_DIR"
    "${extra[@]}"
  )
}

# JVM flags for the broker: use the CDS archive, or have this run dump one.
cds_opts() {
  local jsa
  jsa="$(cds_archive)"
  cds_discard
  # Dumps are written at exit: an old temp file is one nobody will publish.
  find "$SCRIPT_DIR/.kafka" -maxdepth 1 -name 'broker-*.jsa.*.tmp' -mmin +30 -delete 2>/dev/null || true
  if [[ "${KAFKA_CDS:-1}" == 0 ]]; then
    CDS_OPTS=()
  elif [[ -s "$jsa" ]]; then
    CDS_OPTS=(-XX:SharedArchiveFile="$jsa" -Xlog:cds=off -Xlog:cds+dynamic=off)
  else
    local tmp="$jsa.$$.tmp"
    echo "$tmp" >"$KAFKA_DIR/cds.pending"
    CDS_OPTS=(-XX:ArchiveClassesAtExit="$tmp" -Xlog:cds=off -Xlog:cds+dynamic=off)
  fi
}

# Drop a dump in progress or left by a broker that did not stop cleanly.
cds_discard() {
  local tmp
  tmp="$(read_file "$KAFKA_DIR/cds.pending" || true)"
  rm -f "$KAFKA_DIR/cds.pending" ${tmp:+"$tmp"}
}

# After a clean exit: publish the archive the broker dumped, if any.
cds_publish() {
  local tmp jsa
  tmp="$(read_file "$KAFKA_DIR/cds.pending")" || return 0
  rm -f "$KAFKA_DIR/cds.pending"
  jsa="${tmp%.*.tmp}"
  if [[ -s "$tmp" && ! -s "$jsa" ]]; then
    mv -f "$tmp" "$jsa"
    # Archives of other JVM builds are stale now.
    local old
    for old in "$SCRIPT_DIR"/.kafka/broker-*.jsa; do
      [[ "$old" == "$jsa" ]] || rm -f "$old"
    done
  else
    rm -f "$tmp"
  fi
}

write_config() {
  local port="$1" cport="$2"
  cat >"$PROPS" <<EOF
# Generated by deploy/local/kafka.sh on every start; edits are lost.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA

# Single node.
num.partitions=3
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=5
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=5
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
auto.create.topics.enable=true
delete.topic.enable=true
group.initial.rebalance.delay.ms=0
# After a crash (SIGKILL) the restarted broker must wait out the session of its old
# incarnation before it may register again (DUPLICATE_BROKER_REGISTRATION): keep the
# session short (defaults: 2000 / 9000 ms).
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=3000

# Small box.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=2
log.retention.hours=168
EOF
  cat >"$LOG4J" <<'EOF'
# Generated by deploy/local/kafka.sh. Everything goes to stdout, which the script
# appends to $KAFKA_DIR/server.log.
status = warn
name = flywheel-local-kafka
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = info
logger.apache.name = org.apache.kafka
logger.apache.level = info
logger.request.name = kafka.request.logger
logger.request.level = warn
logger.changes.name = state.change.logger
logger.changes.level = warn
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = warn
logger.netclient.name = org.apache.kafka.clients.NetworkClient
logger.netclient.level = warn
EOF
}

format_storage() {
  [[ -f "$DATA/meta.properties" ]] && return 0
  local id
  id="$(new_cluster_id)"
  echo "$id" >"$KAFKA_DIR/cluster_id"
  local cds=() jsa
  jsa="$(cds_archive)"
  [[ "${KAFKA_CDS:-1}" != 0 && -s "$jsa" ]] && cds=(-XX:SharedArchiveFile="$jsa" -Xlog:cds=off -Xlog:cds+dynamic=off)
  if ! "$JAVA_BIN" "${JVM_OPTS[@]}" "${cds[@]}" -XX:TieredStopAtLevel=1 -cp "$LIBS/*" kafka.tools.StorageTool \
    format -t "$id" -c "$PROPS" >>"$LOG_FILE" 2>&1; then
    tail -n 40 "$LOG_FILE" >&2
    die "storage format failed (log: $LOG_FILE)"
  fi
}

# ---------------------------------------------------------------------------- commands

cmd_start() {
  local pid port cport
  if pid="$(running_pid)"; then
    echo "127.0.0.1:$(read_file "$PORT_FILE")"
    return 0
  fi
  libs_present || cmd_fetch
  mkdir -p "$KAFKA_DIR"
  port="${KAFKA_PORT:-}"
  cport="${KAFKA_CONTROLLER_PORT:-}"
  local auto_ports=0
  [[ -z "$port" && -z "$cport" ]] && auto_ports=1
  if [[ -z "$port" ]]; then
    port="$(read_file "$PORT_FILE" || true)"
    if [[ -n "$port" ]] && port_listening "$port"; then port=""; fi
    [[ -n "$port" ]] || port="$(free_port)"
  fi
  if [[ -z "$cport" ]]; then
    cport="$(read_file "$CPORT_FILE" || true)"
    if [[ -n "$cport" ]] && port_listening "$cport"; then cport=""; fi
    [[ -n "$cport" ]] || cport="$(free_port "$port")"
  fi
  if [[ -n "${KAFKA_PORT:-}" ]] && port_listening "$port"; then
    die "KAFKA_PORT $port is already in use"
  fi
  if [[ -n "${KAFKA_CONTROLLER_PORT:-}" ]] && port_listening "$cport"; then
    die "KAFKA_CONTROLLER_PORT $cport is already in use"
  fi
  jvm_opts
  cds_opts

  local timeout="${KAFKA_START_TIMEOUT:-120}" tries=0
  while :; do
    echo "$port" >"$PORT_FILE"
    echo "$cport" >"$CPORT_FILE"
    write_config "$port" "$cport"
    format_storage
    local offset
    offset=$(($(stat -c %s "$LOG_FILE" 2>/dev/null || echo 0) + 1))
    echo "--- kafka.sh start port=$port controller_port=$cport $(date -u +%FT%TZ)" >>"$LOG_FILE"
    "$JAVA_BIN" "${JVM_OPTS[@]}" "${CDS_OPTS[@]}" -cp "$LIBS/*" "$MAIN_CLASS" "$PROPS" \
      </dev/null >>"$LOG_FILE" 2>&1 &
    pid=$!
    echo "$pid" >"$PID_FILE"

    local deadline=$((SECONDS + timeout)) state=wait
    while ((SECONDS < deadline)); do
      if ! alive "$pid"; then
        state=died
        break
      fi
      if tail -c "+$offset" "$LOG_FILE" | grep -qF "$READY_LINE" \
        && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        state=ready
        break
      fi
      sleep 0.1
    done
    if [[ "$state" == ready ]]; then
      echo "127.0.0.1:$port"
      return 0
    fi
    if [[ "$state" == died ]]; then
      wait "$pid" 2>/dev/null || true
      rm -f "$PID_FILE"
      tries=$((tries + 1))
      # Lost a race for an auto-picked port: pick others.
      if ((auto_ports && tries < 3)) && tail -c "+$offset" "$LOG_FILE" | grep -q "Address already in use"; then
        port="$(free_port)"
        cport="$(free_port "$port")"
        continue
      fi
      cds_discard
      tail -c "+$offset" "$LOG_FILE" | tail -n 60 >&2
      die "broker exited during startup (log: $LOG_FILE)"
    fi
    tail -c "+$offset" "$LOG_FILE" | tail -n 60 >&2
    cmd_stop
    die "broker not ready after ${timeout}s (log: $LOG_FILE)"
  done
}

cmd_stop() {
  local pid
  if ! pid="$(running_pid)"; then
    rm -f "$PID_FILE"
    cds_discard
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + ${KAFKA_STOP_TIMEOUT:-60})) clean=1
  while alive "$pid"; do
    if ((SECONDS >= deadline)); then
      echo "kafka.sh: broker $pid did not stop in time; SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
      clean=0
      break
    fi
    sleep 0.05
  done
  rm -f "$PID_FILE"
  if ((clean)); then
    cds_publish
  else
    cds_discard
  fi
}

cmd_status() {
  if running_pid >/dev/null; then
    echo "127.0.0.1:$(read_file "$PORT_FILE")"
    return 0
  fi
  echo "stopped" >&2
  return 3
}

case "${1:-}" in
  fetch) cmd_fetch ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 {fetch|start|stop|status}" >&2
    exit 2
    ;;
esac
