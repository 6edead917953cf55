#!/usr/bin/env bash
# Make sure a Docker engine answers `docker info`.
#
# - Engine already up: exit 0 without output (cheap enough to call before
#   every build or test run).
# - Root and no engine: install Debian's docker.io (plus debootstrap, which
#   kernels/base/bootstrap.sh needs) if dockerd is missing, start the daemon
#   and wait up to 60 s for it.
# - Not root and no engine: explain what to do and exit 1.
set -euo pipefail

LOG_FILE=/var/log/dockerd.log
WAIT_SECONDS=60

log() { echo "ensure-docker: $*" >&2; }

engine_answers() {
    command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1
}

if engine_answers; then
    exit 0
fi

# A DOCKER_HOST pointing somewhere else is not something a local dockerd can
# fix; starting one would only hide the misconfiguration.
if [[ -n "${DOCKER_HOST:-}" && "${DOCKER_HOST}" != "unix:///var/run/docker.sock" && "${DOCKER_HOST}" != "unix:///run/docker.sock" ]]; then
    log "no Docker engine answers at DOCKER_HOST=${DOCKER_HOST}."
    log "Start the engine there, or unset DOCKER_HOST to use a local one."
    exit 1
fi

if [[ "$(id -u)" -ne 0 ]]; then
    if ! command -v dockerd >/dev/null 2>&1; then
        log "Docker is not installed. Install it and start the daemon as root:"
        log "    sudo apt-get install docker.io debootstrap"
        log "    sudo systemctl start docker    # or: sudo $0"
        log "then let your user talk to it (log out and back in afterwards):"
        log "    sudo usermod -aG docker $(id -un)"
    elif [[ -S /var/run/docker.sock && ! -w /var/run/docker.sock ]]; then
        log "the Docker daemon runs, but $(id -un) may not use /var/run/docker.sock."
        log "Add yourself to the docker group, then log out and back in:"
        log "    sudo usermod -aG docker $(id -un)"
    else
        log "the Docker daemon is not running. Start it as root:"
        log "    sudo systemctl start docker    # or: sudo $0"
        log "and make sure your user is in the docker group:"
        log "    sudo usermod -aG docker $(id -un)"
    fi
    exit 1
fi

if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    log "installing docker.io and debootstrap with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
fi

if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    # Under systemd the unit owns the daemon; a second hand-started dockerd
    # would fight it over the socket and pid file.
    log "starting docker.service with systemctl"
    systemctl start docker
    dockerd_pid=""
else
    log "starting dockerd in the background (log: ${LOG_FILE})"
    # setsid: the daemon must outlive the shell (and process group) that started it.
    setsid nohup dockerd >>"${LOG_FILE}" 2>&1 </dev/null &
    dockerd_pid=$!
fi

for ((i = 0; i < WAIT_SECONDS; i++)); do
    if engine_answers; then
        log "Docker engine is up ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo 'version unknown'))"
        exit 0
    fi
    # A daemon that already exited will never answer: report now instead of
    # waiting out the full minute.
    if [[ -n "${dockerd_pid}" ]] && ! kill -0 "${dockerd_pid}" 2>/dev/null; then
        log "dockerd exited early; last lines of ${LOG_FILE}:"
        tail -n 20 "${LOG_FILE}" >&2 || true
        exit 1
    fi
    sleep 1
done

log "Docker engine did not answer within ${WAIT_SECONDS} s."
if [[ -n "${dockerd_pid}" ]]; then
    log "last lines of ${LOG_FILE}:"
    tail -n 20 "${LOG_FILE}" >&2 || true
fi
exit 1
