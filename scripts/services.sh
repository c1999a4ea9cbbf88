#!/usr/bin/env bash
# Make sure the Redis and PostgreSQL the tests use are running on loopback; start them if not.
# Redis: 127.0.0.1:6379, keeps nothing on disk; the tests also start redis-servers of their
# own (tests/own_redis.py), so the program is installed even when a Redis already answers.
# PostgreSQL: 127.0.0.1:5432, database `test`, user `postgres` without a password (trust
# auth on loopback). Debian's packages create the cluster with password auth on 127.0.0.1:
# this script then adds loopback trust lines to pg_hba.conf (and says so).
# SERVICES_PG_PORT and SERVICES_PG_SOCKET_DIR point the PostgreSQL checks and set-up at
# another cluster that is already running (to try this script on one; the tests use 5432).
set -euo pipefail

PG_PORT="${SERVICES_PG_PORT:-5432}"
PG_SOCKET_DIR="${SERVICES_PG_SOCKET_DIR:-/var/run/postgresql}"

apt_install() { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
pg_up() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null; }
# what the tests do: user postgres over TCP on loopback, never prompting for a password
pg_trusts() { psql -w "postgresql://postgres@127.0.0.1:$PG_PORT/postgres" -tAc 'SELECT 1' >/dev/null 2>&1; }
# as the postgres superuser over the Unix socket (peer auth): works whatever pg_hba says of TCP
pg_admin() {
  local psql=(psql -w -h "$PG_SOCKET_DIR" -p "$PG_PORT" -v ON_ERROR_STOP=1 -tA)
  if [ "$(id -un)" = postgres ]; then "${psql[@]}" "$@"
  elif [ "$(id -u)" = 0 ]; then runuser -u postgres -- "${psql[@]}" "$@"
  else
    echo "postgresql: user postgres needs a password on 127.0.0.1; run this script as root" \
      "(or as postgres) once to trust it on loopback, or make it so by hand (pg_hba.conf)" >&2
    return 1
  fi
}

command -v redis-server >/dev/null || apt_install redis-server
if ! redis_up; then
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
fi
redis_up || { echo "redis did not start" >&2; exit 1; }

if ! pg_up; then
  if ! ls /etc/postgresql >/dev/null 2>&1; then apt_install postgresql; fi
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  for _ in $(seq 100); do pg_up && break; sleep 0.2; done
fi
pg_up || { echo "postgresql did not start on 127.0.0.1:$PG_PORT" >&2; exit 1; }
if ! pg_trusts; then
  hba="$(pg_admin -c 'SHOW hba_file')" || {
    echo "postgresql: cannot ask where pg_hba.conf is (as postgres over $PG_SOCKET_DIR)" >&2
    exit 1
  }
  echo "services: $hba: trusting user postgres on loopback (127.0.0.1, ::1) for the tests"
  lines=$'# riskd tests (scripts/services.sh): postgres on loopback without a password\n'
  lines+=$'host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust\n'
  # first match wins in pg_hba.conf: the lines go on top
  { printf '%s' "$lines"; cat "$hba"; } > "$hba.riskd" && cat "$hba.riskd" > "$hba" && rm -f "$hba.riskd"
  pg_admin -c 'SELECT pg_reload_conf()' >/dev/null
  for _ in $(seq 50); do pg_trusts && break; sleep 0.1; done
  pg_trusts || { echo "postgresql: user postgres cannot log in on 127.0.0.1 without a password" >&2; exit 1; }
fi
if [ -z "$(psql -w "postgresql://postgres@127.0.0.1:$PG_PORT/postgres" -tAc "SELECT 1 FROM pg_database WHERE datname='test'")" ]; then
  psql -w "postgresql://postgres@127.0.0.1:$PG_PORT/postgres" -qc 'CREATE DATABASE test'
fi
echo "services: redis and postgresql are up"
