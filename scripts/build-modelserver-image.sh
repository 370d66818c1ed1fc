#!/usr/bin/env bash
# Build the reference model service's image, mmanager/modelserver:latest, locally (no registry):
# the project's Python base (scripts/build-base-image.sh), torch's CPU wheel, the modelserver package,
# and weights made at build time from a fixed seed (python -m modelserver.weights).
#
#   scripts/build-modelserver-image.sh [--force] [--gpu] [--help]
#
# --gpu builds mmanager/modelserver:gpu from deploy/modelserver/Dockerfile.gpu instead (CUDA torch
# from $TORCH_GPU_INDEX_URL; run it with deploy/modelserver/docker-compose.gpu.yml).
# Cached twice over: nothing happens when an image built from the same sources (modelserver/,
# deploy/modelserver/, the torch version and the base image, hashed into a label) exists, and the
# torch wheel is downloaded once into $MMANAGER_IMAGE_CACHE (/var/cache/mmanager/modelserver).
# TORCH_VERSION (2.13.0) and TORCH_INDEX_URL (https://download.pytorch.org/whl/cpu, tried beside
# pip's own configuration; a local +cpu wheel that pip already finds is taken as it is) pick the wheel.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BASE_IMAGE="${MMANAGER_BASE_IMAGE:-mmanager/python-base:bookworm}"
CACHE="${MMANAGER_IMAGE_CACHE:-/var/cache/mmanager}/modelserver"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
TORCH_GPU_INDEX_URL="${TORCH_GPU_INDEX_URL:-https://download.pytorch.org/whl/cu128}"
PIP="${PIP:-pip}"
command -v "$PIP" >/dev/null || PIP="python3 -m pip"

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
}

force=0
gpu=0
for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        -f|--force) force=1 ;;
        --gpu) gpu=1 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

if [ "$gpu" = 1 ]; then
    IMAGE="${MMANAGER_MODELSERVER_IMAGE:-mmanager/modelserver:gpu}"
    DOCKERFILE=Dockerfile.gpu
else
    IMAGE="${MMANAGER_MODELSERVER_IMAGE:-mmanager/modelserver:latest}"
    DOCKERFILE=Dockerfile
fi

bash "$ROOT/scripts/build-base-image.sh"

# What the image is made of; the label lets a later run skip the build without sending a context.
sources() {
    cd "$ROOT"
    find modelserver deploy/modelserver -type f ! -path '*/__pycache__/*' ! -name '*.pyc' | LC_ALL=C sort \
        | xargs sha256sum
    echo "torch $TORCH_VERSION gpu=$gpu base $(docker image inspect -f '{{.Id}}' "$BASE_IMAGE")"
}
digest="$(sources | sha256sum | cut -c1-16)"
built="$(docker image inspect -f '{{ index .Config.Labels "org.mmanager.modelserver.sources" }}' "$IMAGE" 2>/dev/null || true)"
if [ "$force" = 0 ] && [ "$built" = "$digest" ]; then
    echo "==> $IMAGE is up to date (sources $digest); nothing to do (--force rebuilds it)"
    exit 0
fi

context="$CACHE/context"
rm -rf "$context"
mkdir -p "$context/wheels" "$CACHE/wheels"
if [ "$gpu" = 0 ]; then
    # The CPU wheel, once: the image installs it from the build context, so the build needs no index
    # that serves it (the CPU index may be unreachable from inside builds behind a proxy).
    arch="$(uname -m)"
    if ! ls "$CACHE/wheels"/torch-"$TORCH_VERSION"*-cp311-*"$arch".whl >/dev/null 2>&1; then
        echo "==> downloading torch $TORCH_VERSION (CPU) for Python 3.11 into $CACHE/wheels"
        $PIP download --quiet --no-deps --only-binary=:all: --dest "$CACHE/wheels" \
            --python-version 3.11 --implementation cp --abi cp311 \
            --platform "manylinux_2_28_$arch" --platform "manylinux2014_$arch" \
            --extra-index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
    fi
    wheel="$(ls "$CACHE/wheels"/torch-"$TORCH_VERSION"*-cp311-*"$arch".whl | head -n1)"
    ln "$wheel" "$context/wheels/" 2>/dev/null || cp "$wheel" "$context/wheels/"
fi
cp -r "$ROOT/modelserver" "$context/modelserver"
find "$context/modelserver" -name __pycache__ -prune -exec rm -rf {} +
cp "$ROOT/deploy/modelserver/$DOCKERFILE" "$context/Dockerfile"

echo "==> building $IMAGE (sources $digest)"
docker build -q -t "$IMAGE" \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_VERSION=$TORCH_VERSION" \
    --build-arg "TORCH_INDEX_URL=$TORCH_GPU_INDEX_URL" \
    --label "org.mmanager.modelserver.sources=$digest" "$context" >/dev/null
rm -rf "$context"
echo "==> built $IMAGE"
