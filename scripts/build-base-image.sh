#!/usr/bin/env bash
# Make the Python base image of the hub and controller images locally, with no registry:
# a Debian bookworm root filesystem from debootstrap (minbase, plus python3, python3-venv and
# ca-certificates), imported with `docker import`.
#
#   scripts/build-base-image.sh [--force] [--help]
#
# Idempotent: nothing happens when the image (at this script's revision) exists. The downloaded
# .debs and the finished root filesystem tarball are cached under $MMANAGER_IMAGE_CACHE
# (/var/cache/mmanager/base), so a rebuild after `docker rmi` is a few seconds.
# Needs root (debootstrap does) and a reachable Debian mirror ($DEBIAN_MIRROR). The site's own CAs
# in $MMANAGER_EXTRA_CA_DIR (/usr/local/share/ca-certificates, Debian's place for them; empty: none)
# are trusted in the image as on this host, so pip behind a TLS-inspecting proxy works in the builds.
set -euo pipefail

IMAGE="${MMANAGER_BASE_IMAGE:-mmanager/python-base:bookworm}"
SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CACHE="${MMANAGER_IMAGE_CACHE:-/var/cache/mmanager/base}"
PACKAGES="python3,python3-venv,ca-certificates"
# Bump when what goes into the image changes, so machines that made an older one remake it.
REVISION=2
EXTRA_CA_DIR="${MMANAGER_EXTRA_CA_DIR-/usr/local/share/ca-certificates}"

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
}

force=0
for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        -f|--force) force=1 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

have_image() {
    [ "$(docker image inspect -f '{{ index .Config.Labels "org.mmanager.base.revision" }}' "$IMAGE" 2>/dev/null)" \
        = "$REVISION" ]
}

if [ "$force" = 0 ] && have_image; then
    echo "==> $IMAGE exists (revision $REVISION); nothing to do (--force remakes it)"
    exit 0
fi

tarball="$CACHE/$SUITE-r$REVISION.tar"
import_tarball() {
    echo "==> importing $tarball as $IMAGE"
    docker import \
        --change "LABEL org.mmanager.base.revision=$REVISION org.mmanager.base.suite=$SUITE" \
        --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' \
        "$tarball" "$IMAGE" >/dev/null
}

if [ "$force" = 0 ] && [ -s "$tarball" ]; then
    import_tarball
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "debootstrap needs root: run this script with sudo (or import a cached $tarball)" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    echo "==> installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq debootstrap >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
fi

mkdir -p "$CACHE/debs"
root="$(mktemp -d /var/tmp/mmanager-rootfs.XXXXXX)"
cleanup() {
    # debootstrap may leave proc/sys mounted when it fails half-way.
    umount -l "$root/proc" "$root/sys" 2>/dev/null || true
    rm -rf --one-file-system "$root"
}
trap cleanup EXIT

echo "==> debootstrap --variant=minbase --include=$PACKAGES $SUITE ($MIRROR)"
debootstrap --variant=minbase --include="$PACKAGES" --cache-dir="$CACHE/debs" "$SUITE" "$root" "$MIRROR" \
    >"$CACHE/debootstrap.log" 2>&1 || { tail -n 30 "$CACHE/debootstrap.log" >&2; exit 1; }

if [ -n "$EXTRA_CA_DIR" ] && compgen -G "$EXTRA_CA_DIR/*.crt" >/dev/null; then
    echo "==> trusting the site CAs of $EXTRA_CA_DIR"
    cp "$EXTRA_CA_DIR"/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null
fi

# Smaller image: no package lists, no .deb cache, no docs or man pages.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/var/cache/debconf/*-old "$root"/var/log/*.log
# The engine provides these at run time.
rm -rf "${root:?}"/dev/* "${root:?}"/proc/* "${root:?}"/sys/* "${root:?}"/tmp/*
"$root/usr/bin/python3" --version >/dev/null 2>&1 || chroot "$root" python3 --version >/dev/null

tar --numeric-owner -C "$root" -cf "$tarball.tmp" .
mv "$tarball.tmp" "$tarball"
import_tarball
echo "==> $IMAGE: $(docker image inspect -f '{{ .Size }}' "$IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
