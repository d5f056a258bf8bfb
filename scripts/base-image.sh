#!/usr/bin/env bash
# A base image for infra/Dockerfile made without any container registry: Debian from Debian's own
# package archive (debootstrap), Python in /opt/venv, and the CPU torch wheel that pip resolves on
# this host. It plays the part the pytorch/pytorch image plays on a cluster (an OS, Python and
# torch; the Dockerfile freezes that torch), so the same Dockerfile builds both.
#   usage: scripts/base-image.sh [tag]      (needs root, debootstrap and podman or docker)
set -euo pipefail
TAG="${1:-localhost/moecl-base:bookworm}"
ENGINE="${ENGINE:-$(command -v podman || command -v docker)}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
TORCH="${TORCH:-torch==2.13.0}"

if "$ENGINE" image exists "$TAG" 2>/dev/null || "$ENGINE" image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG exists"; exit 0
fi
root="$(mktemp -d /var/tmp/moecl-base.XXXXXX)"
trap 'umount -R "$root/proc" 2>/dev/null || true; rm -rf "$root"' EXIT

debootstrap --variant=minbase --include=python3,python3-venv,git,ca-certificates "$SUITE" "$root" "$MIRROR"

# The host's extra CA certificates (a TLS-intercepting proxy) so that pip reaches PyPI from the build.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"

# torch as the host resolves it (a local wheel where the host keeps one; a CPU build, not CUDA's).
wheels="$(mktemp -d)"
${PIP:-python3 -m pip} download --no-deps --dest "$wheels" "$TORCH" --quiet
mkdir -p "$root/tmp/wheels" && cp "$wheels"/*.whl "$root/tmp/wheels/" && rm -rf "$wheels"
mount -t proc proc "$root/proc"
chroot "$root" /usr/bin/env -i PATH=/usr/bin:/bin PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 HOME=/root bash -euc '
    python3 -m venv /opt/venv
    /opt/venv/bin/pip install --no-cache-dir --quiet /tmp/wheels/*.whl
    /opt/venv/bin/python -c "import torch; print(\"torch\", torch.__version__)"
    rm -rf /tmp/wheels /var/cache/apt/archives/*.deb /var/lib/apt/lists/* /root/.cache'
umount "$root/proc"

tar -C "$root" -c . | "$ENGINE" import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["/bin/bash"]' - "$TAG"
echo "base image $TAG built"
