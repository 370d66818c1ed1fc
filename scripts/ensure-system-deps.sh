#!/usr/bin/env bash
# Install what the project needs from the OS when it is missing: Debian's
# docker.io (the engine), postgresql (server binaries, for the tests' throwaway
# cluster), busybox-static (the example image is built FROM scratch around
# it), prometheus (promtool and the server, for the monitoring tests), prometheus-alertmanager (amtool
# and the server, for the alerting tests),
# docker-compose and haproxy (the gateway), docker-registry and apache2-utils (a real registry for the pull tests, and htpasswd for its logins), chromium and chromium-driver (the console's browser test). With "demo" as the first argument only Docker, busybox and
# haproxy are needed.
set -euo pipefail

need=()
if ! docker info >/dev/null 2>&1 && ! command -v dockerd >/dev/null 2>&1; then
    need+=(docker.io)
fi
if [ "${1:-}" != demo ]; then
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || need+=(postgresql)
fi
if [ "${1:-}" != demo ]; then
    # promtool tests the alert rules, a real Prometheus scrapes a real hub in the tests,
    # and docker-compose validates the compose files.
    command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
    # amtool checks the shipped Alertmanager config; a real Alertmanager carries alerts to a test's webhook.
    command -v amtool >/dev/null 2>&1 && command -v prometheus-alertmanager >/dev/null 2>&1 \
        || need+=(prometheus-alertmanager)
    command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
    # A controller pulls a missing image on create: tested against a real registry on 127.0.0.1.
    command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
    # A registry that needs a login: its bcrypt htpasswd file is written with htpasswd.
    command -v htpasswd >/dev/null 2>&1 || need+=(apache2-utils)
    # The web console's browser test drives a headless Chromium through its WebDriver.
    command -v chromium >/dev/null 2>&1 || need+=(chromium)
    command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
fi
# The gateway (`mmanager gateway serve`, the demo's too) runs HAProxy; its latency histograms are
# tested in a real one.
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
if command -v dpkg >/dev/null 2>&1 && ! dpkg -s busybox-static >/dev/null 2>&1; then
    need+=(busybox-static)
fi

[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; }
else
    echo "Missing system packages: ${need[*]}." >&2
    echo "On Debian/Ubuntu: sudo apt-get install -y ${need[*]}; elsewhere install the equivalents." >&2
    exit 1
fi
