#!/usr/bin/env bash
# Make sure a local PostgreSQL server runs and has a role the test suite may create databases
# with; print that server's URL (postgresql+asyncpg://ROLE:PASSWORD@HOST:PORT) on stdout.
#
# - A server already answering on PGHOST/PGPORT (127.0.0.1:5432 by default): only the role is
#   made (as the `postgres` superuser over the local socket, through `su` when root).
# - Root and no server: install Debian's postgresql if missing, start its cluster, make the role.
# - Not root and no server: explain what to do and exit 1.
set -euo pipefail

# Callers read stdout as the URL (url=$(bash scripts/ensure-postgres.sh)), so nothing else may
# write there, and nothing started here may keep it open: a server started inside the command
# substitution would hold its pipe, and the caller would wait for it forever. Everything runs in
# `serve` with stdout sent to stderr and stdin closed; only the last line prints the URL.

HOST=${PGHOST:-127.0.0.1}
PORT=${PGPORT:-5432}
ROLE=${BAI_PG_ROLE:-backendai_test}
PASSWORD=${BAI_PG_PASSWORD:-backendai_test}

log() { echo "ensure-postgres: $*" >&2; }

answers() { command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h "$HOST" -p "$PORT"; }

as_postgres() { if [[ "$(id -u)" -eq 0 ]]; then su postgres -c "$*"; else bash -c "$*"; fi; }

serve() {
    if answers; then return; fi
    if [[ "$(id -u)" -ne 0 ]]; then
        log "no PostgreSQL server answers at $HOST:$PORT. As root: apt-get install postgresql,"
        log "then start it (pg_ctlcluster <version> main start), or run this script as root."
        exit 1
    fi
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
        log "installing PostgreSQL (Debian's postgresql)"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
    version=$(ls "${PG_LIBDIR:-/usr/lib/postgresql}" | sort -V | tail -1)
    if ! pg_lsclusters -h | awk '{print $1, $2}' | grep -qx "$version main"; then
        pg_createcluster "$version" main >/dev/null
    fi
    # Installing may have started it already; starting a running cluster fails harmlessly.
    answers || pg_ctlcluster "$version" main start || true
    for _ in $(seq 60); do answers && break; sleep 0.5; done
    answers || { log "PostgreSQL $version did not start; see /var/log/postgresql/"; exit 1; }
}

serve </dev/null >&2

as_postgres "psql -p $PORT -qAtc \"SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'\"" </dev/null | grep -q 1 \
    || as_postgres "psql -p $PORT -qc \"CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD'\"" </dev/null >/dev/null
echo "postgresql+asyncpg://$ROLE:$PASSWORD@$HOST:$PORT"
