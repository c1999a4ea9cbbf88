#!/usr/bin/env bash
# Make sure the Redis and PostgreSQL the tests use are running on loopback; start them if not.
# Redis: 127.0.0.1:6379, keeps nothing on disk. PostgreSQL: 127.0.0.1:5432, database `test`.
set -euo pipefail

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

if ! redis_up; then
  if ! command -v redis-server >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
fi
redis_up || { echo "redis did not start" >&2; exit 1; }

if ! pg_up; then
  if ! ls /etc/postgresql >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  for _ in $(seq 100); do pg_up && break; sleep 0.2; done
fi
pg_up || { echo "postgresql did not start" >&2; exit 1; }
# The tests connect as the current user to database `test` (trust auth on loopback).
psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_roles WHERE rolname='$(whoami)'" 2>/dev/null | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -c "CREATE ROLE \"$(whoami)\" SUPERUSER LOGIN" >/dev/null 2>&1 || true
psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" 2>/dev/null | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE test" >/dev/null 2>&1 || true
echo "services: redis and postgresql are up"
