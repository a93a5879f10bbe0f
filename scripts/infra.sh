#!/usr/bin/env bash
# Make RabbitMQ (with the management plugin) and PostgreSQL available.
# With a working Docker engine: `docker compose up` of the rabbitmq and postgres services.
# Without Docker: the machine's own servers, started if they are down.
set -euo pipefail
cd "$(dirname "$0")/.."

wait_for() { # wait_for <what> <seconds> <command...>
  local what=$1 seconds=$2; shift 2
  for _ in $(seq "$seconds"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "infra: $what is not available after ${seconds}s" >&2
  return 1
}

if [ -z "${TILLSYNC_LOCAL_INFRA:-}" ] && command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  echo "infra: Docker found, starting rabbitmq and postgres with docker compose"
  docker compose up -d --wait rabbitmq postgres
  exit 0
fi

echo "infra: no Docker engine, using the local PostgreSQL and RabbitMQ servers"
if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
  echo "infra: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
fi
wait_for "PostgreSQL on 127.0.0.1:5432" 60 pg_isready -h 127.0.0.1 -p 5432

if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
  echo "infra: starting RabbitMQ"
  scripts/start-rabbitmq.sh   # with room for many connections (open files)
fi
wait_for "RabbitMQ" 90 rabbitmq-diagnostics -q ping
if ! rabbitmq-plugins list -e -m 2>/dev/null | grep -qx rabbitmq_management; then
  echo "infra: enabling the RabbitMQ management plugin"
  rabbitmq-plugins enable rabbitmq_management >/dev/null
fi
wait_for "RabbitMQ management API on 127.0.0.1:15672" 90 curl -sf -u guest:guest http://127.0.0.1:15672/api/overview
sockets=$(curl -sf -u guest:guest http://127.0.0.1:15672/api/nodes | python3 -c 'import json,sys; v=[n["sockets_total"] for n in json.load(sys.stdin) if n.get("sockets_total")]; print(min(v) if v else "")' 2>/dev/null || echo "")
if [ -n "$sockets" ] && [ "$sockets" -lt 2000 ]; then
  echo "infra: note: RabbitMQ allows only $sockets connections (its open-files limit); the benchmark's fan-out needs more:" \
       "restart it with a higher limit: rabbitmqctl shutdown && scripts/start-rabbitmq.sh" >&2
fi
echo "infra: PostgreSQL and RabbitMQ (with management API) are up"
