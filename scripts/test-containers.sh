#!/usr/bin/env bash
# The container suite: builds the project's image from infra/Dockerfile and runs tests/containers
# against it (the embedded pipeline with every KFP step inside the image, a step failing inside its
# container, the MLflow server as infra/ deploys it, the installed package). No Kubernetes here:
# what only a cluster does (scheduling, GPUs, Pod Security admission) is checked on the manifests.
#   BASE_IMAGE=...   build on this image (Python + torch) instead of one made from Debian's packages
#   ENGINE=docker    use a running Docker daemon instead of podman
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE="${IMAGE:-localhost/moecl:test}"

if [ -z "${ENGINE:-}" ]; then
    if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap uidmap >/dev/null
    fi
    ENGINE=podman
fi

if [ "$ENGINE" = podman ]; then
    # crun refuses these machines' hybrid cgroup layout; the default ulimits must not exceed the
    # shell's hard limits or no container starts.
    conf="$(mktemp -d)"
    nproc=$(ulimit -Hu); [ "$nproc" = unlimited ] || [ "$nproc" -gt 16384 ] && nproc=16384
    cat > "$conf/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
    export CONTAINERS_CONF="$conf/containers.conf"
    # kfp's DockerRunner and the tests talk to the Docker API: podman serves it on a socket.
    export DOCKER_HOST="unix://$conf/podman.sock"
    podman system service --time=0 "$DOCKER_HOST" &
    service=$!
    trap 'kill $service 2>/dev/null || true; rm -rf "$conf"' EXIT
    build=(podman build --format docker --ignorefile infra/Dockerfile.dockerignore)
else
    build=(docker build)
fi

if [ -z "${BASE_IMAGE:-}" ]; then
    BASE_IMAGE=localhost/moecl-base:bookworm
    ENGINE="$ENGINE" bash scripts/base-image.sh "$BASE_IMAGE"
fi
started=$(date +%s)
"${build[@]}" -f infra/Dockerfile --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg REQUIRE_CUDA=0 \
    --build-arg GIT_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)" -t "$IMAGE" . >/tmp/moecl-image-build.log 2>&1 \
    || { tail -40 /tmp/moecl-image-build.log; exit 1; }
echo "image $IMAGE built in $(( $(date +%s) - started ))s (log: /tmp/moecl-image-build.log)"

for _ in $(seq 30); do [ -S "${DOCKER_HOST#unix://}" ] || [ "$ENGINE" != podman ] && break; sleep 1; done
MOECL_IMAGE="$IMAGE" .venv/bin/python -m pytest -q tests/containers
