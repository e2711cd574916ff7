#!/usr/bin/env bash
# Installs what deploy/local/postgres.sh and deploy/local/kafka.sh need, when missing:
#   - PostgreSQL server binaries (apt package `postgresql`)
#   - Java 17+ and Maven (apt packages `openjdk-17-jre-headless`, `maven`)
#   - the Kafka broker jars (deploy/local/kafka.sh fetch)
# Idempotent and silent when everything is already present. Needs root (or sudo) only
# when an apt package is missing.
#
# Usage: deploy/local/install.sh
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() {
  echo "install.sh: $*" >&2
}

have_postgres() {
  local d
  if command -v pg_config >/dev/null 2>&1; then
    d="$(pg_config --bindir 2>/dev/null || true)"
    [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/pg_isready" ]] && return 0
  fi
  for d in /usr/lib/postgresql/*/bin; do
    [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/pg_isready" ]] && return 0
  done
  return 1
}

java_major() {
  local java="java" v
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
    java="$JAVA_HOME/bin/java"
  fi
  command -v "$java" >/dev/null 2>&1 || return 1
  # e.g. `openjdk version "17.0.15" 2025-04-15` -> 17 ("1.8.0_x" -> 1, too old anyway)
  v="$("$java" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1)"
  [[ -n "$v" ]] && echo "$v"
}

have_java17() {
  local v
  v="$(java_major)" || return 1
  ((v >= 17))
}

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
  SUDO=(sudo)
fi

APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null 2>&1 || {
    log "apt-get not found; install these yourself: $*"
    exit 1
  }
  log "installing $*"
  export DEBIAN_FRONTEND=noninteractive
  # Update the package lists only when they are missing or the install fails.
  if [[ $APT_UPDATED -eq 0 ]] && ! compgen -G "/var/lib/apt/lists/*_Packages" >/dev/null; then
    "${SUDO[@]}" apt-get update -qq
    APT_UPDATED=1
  fi
  if ! "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null; then
    [[ $APT_UPDATED -eq 1 ]] && exit 1
    "${SUDO[@]}" apt-get update -qq
    APT_UPDATED=1
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  fi
}

missing=()
have_postgres || missing+=(postgresql)
have_java17 || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
# runuser (util-linux) runs the server as the `postgres` OS user.
command -v runuser >/dev/null 2>&1 || missing+=(util-linux)
if ((${#missing[@]})); then
  apt_install "${missing[@]}"
fi

have_postgres || {
  log "PostgreSQL server binaries still not found"
  exit 1
}
have_java17 || {
  log "Java 17+ still not found"
  exit 1
}

"$SCRIPT_DIR/kafka.sh" fetch
