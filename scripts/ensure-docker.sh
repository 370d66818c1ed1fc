#!/usr/bin/env bash
# Make sure a Docker engine answers. On a Debian-like machine where we are root,
# install docker.io and start dockerd ourselves; anywhere else, say what to do.
set -euo pipefail

if docker info >/dev/null 2>&1; then
    exit 0
fi

is_root() { [ "$(id -u)" = 0 ]; }
is_debian() { command -v apt-get >/dev/null 2>&1; }

if ! command -v dockerd >/dev/null 2>&1; then
    if is_root && is_debian; then
        echo "==> installing docker.io (no Docker engine found)"
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null; then
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
        fi
    else
        echo "No Docker engine is reachable and dockerd is not installed." >&2
        echo "Install Docker (https://docs.docker.com/engine/install/) and start it, or set DOCKER_HOST." >&2
        exit 1
    fi
fi

if ! is_root; then
    echo "dockerd is installed but not running, and starting it needs root: run 'sudo dockerd &' or 'sudo systemctl start docker'." >&2
    exit 1
fi

echo "==> starting dockerd"
# A dockerd that was killed leaves its pid file behind, and a new one refuses to start over it.
if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    rm -f /var/run/docker.pid
fi
mkdir -p /var/log
# A session of its own: ending the shell or job that started it (a process-group kill) must not stop it.
setsid nohup dockerd >/var/log/mmanager-dockerd.log 2>&1 </dev/null &
for _ in $(seq 1 60); do
    if docker info >/dev/null 2>&1; then
        exit 0
    fi
    sleep 0.5
done
echo "dockerd did not come up; see /var/log/mmanager-dockerd.log" >&2
tail -n 20 /var/log/mmanager-dockerd.log >&2 || true
exit 1
