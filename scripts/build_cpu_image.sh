#!/usr/bin/env bash
# Build docker/Dockerfile.cpu with no registry and no Docker engine, then train in the image.
#
#   sudo scripts/build_cpu_image.sh            # base (debootstrap), image, a 20-step 2-rank run inside
#   sudo scripts/build_cpu_image.sh --no-run   # build only
#   sudo scripts/build_cpu_image.sh --clean    # ... and remove the image storage afterwards
#
# 1. base: `debootstrap --variant=minbase bookworm` imported as localhost/competesmoe-base:bookworm
#    (once; kept in the storage below).
# 2. image: `buildah bud` (chroot isolation, vfs storage) of docker/Dockerfile.cpu from a clean context
#    (only the files the image needs), BASE_IMAGE=the local base; torch's CPU wheel (torch==2.13.0+cpu)
#    comes from a folder lent to the build (TORCH_WHEELS, default /opt/wheels), everything else from
#    PyPI, with the host's CA bundle lent for pip (HOST_CA); neither is baked into the image. One
#    working container for the whole build (no per-step layers: vfs copies the whole tree per layer).
# 3. run: `buildah run` of `competesmoe launch --nproc 2 configs/tiny-cpu.yaml` (20 steps) inside the
#    image, its output_dir bound to a host folder, then checks metrics.jsonl: 20 train steps, the loss
#    fell, a test evaluation.
#
# Needs root and Debian's buildah and debootstrap. Storage: COMPETESMOE_STORAGE
# (default /var/tmp/competesmoe-containers), separate from the system's container storage.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STORE=${COMPETESMOE_STORAGE:-/var/tmp/competesmoe-containers}
IMAGE=${IMAGE:-localhost/competesmoe:cpu}
BASE=localhost/competesmoe-base:bookworm
WHEELS=${TORCH_WHEELS:-/opt/wheels}
# the CPU build of torch from that folder; its dependencies and the rest from PyPI
TORCH_LOCAL_VERSION=${TORCH_LOCAL_VERSION:-2.13.0+cpu}
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
RUN=1 CLEAN=0
for arg in "$@"; do
  case "$arg" in
    --no-run) RUN=0 ;;
    --clean) CLEAN=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "build_cpu_image: unknown option $arg" >&2; exit 2 ;;
  esac
done

fail() { echo "build_cpu_image: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || fail "needs root (debootstrap and buildah's chroot isolation)"
command -v buildah >/dev/null || fail "buildah is missing (apt-get install buildah)"
command -v debootstrap >/dev/null || fail "debootstrap is missing (apt-get install debootstrap)"

BUILDAH=(buildah --root "$STORE/storage" --runroot "$STORE/run" --storage-driver vfs)
export BUILDAH_ISOLATION=chroot
work=$(mktemp -d /var/tmp/competesmoe-build.XXXXXX)
containers=()
cleanup() {
  for c in "${containers[@]}"; do "${BUILDAH[@]}" rm "$c" >/dev/null 2>&1 || true; done
  rm -rf "$work"
  if [ "$CLEAN" = 1 ]; then "${BUILDAH[@]}" rmi --all --force >/dev/null 2>&1 || true; rm -rf "$STORE"; fi
}
trap cleanup EXIT
phase() { echo "== $* ($(date +%T))"; }
started=$SECONDS

# -- 1. base -------------------------------------------------------------------------------------
if "${BUILDAH[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  phase "base $BASE already built"
else
  phase "base: debootstrap --variant=minbase bookworm"
  t=$SECONDS
  debootstrap --variant=minbase bookworm "$work/rootfs" "$MIRROR" > "$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap failed"; }
  tar -C "$work/rootfs" --numeric-owner -cf "$work/rootfs.tar" .
  rm -rf "$work/rootfs"
  c=$("${BUILDAH[@]}" from scratch); containers+=("$c")
  "${BUILDAH[@]}" add "$c" "$work/rootfs.tar" / >/dev/null
  "${BUILDAH[@]}" config --cmd /bin/bash "$c"
  "${BUILDAH[@]}" commit --quiet "$c" "$BASE" >/dev/null
  rm -f "$work/rootfs.tar"
  echo "base built in $((SECONDS - t)) s"
fi

# -- 2. image ------------------------------------------------------------------------------------
phase "image: buildah bud docker/Dockerfile.cpu -> $IMAGE"
t=$SECONDS
ctx="$work/context"
mkdir -p "$ctx"
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/common" "$ROOT/moe" "$ROOT/parallel" "$ROOT/data" \
      "$ROOT/launcher" "$ROOT/experiments" "$ROOT/configs" "$ctx/"
cp "$ROOT/docker/Dockerfile.cpu" "$work/Dockerfile"
find "$ctx" -name __pycache__ -prune -exec rm -rf {} +
[ -d "$WHEELS" ] || mkdir -p "$work/no-wheels"
"${BUILDAH[@]}" bud --isolation chroot --layers=false --force-rm --format docker -f "$work/Dockerfile" \
  --build-arg BASE_IMAGE="$BASE" \
  --build-arg TORCH_VERSION="$TORCH_LOCAL_VERSION" \
  --build-arg TORCH_INDEX_URL=https://pypi.org/simple --build-arg TORCH_FIND_LINKS=/wheels \
  --build-arg PIP_CERT=/etc/ssl/host-ca.crt \
  --volume "$( [ -d "$WHEELS" ] && echo "$WHEELS" || echo "$work/no-wheels"):/wheels:ro" \
  --volume "$HOST_CA:/etc/ssl/host-ca.crt:ro" \
  -t "$IMAGE" "$ctx"
echo "image built in $((SECONDS - t)) s"
"${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || true  # the image this tag pointed at before
"${BUILDAH[@]}" images "$IMAGE"

# -- 3. a training run inside ---------------------------------------------------------------------
if [ "$RUN" = 1 ]; then
  phase "run: competesmoe launch --nproc 2 (20 steps) inside $IMAGE"
  t=$SECONDS
  out="$work/runs"
  mkdir -p "$out"
  c=$("${BUILDAH[@]}" from "$IMAGE"); containers+=("$c")
  "${BUILDAH[@]}" run --isolation chroot --volume "$out:/workspace/runs" "$c" -- \
    competesmoe launch --nproc 2 /opt/competesmoe/configs/tiny-cpu.yaml output_dir=/workspace/runs/tiny \
      train.max_steps=20 train.log_every=5 train.eval_every=0 train.eval_batches=2 train.checkpoint_every=0
  python3 - "$out/tiny/metrics.jsonl" <<'EOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in records if r["split"] == "train"]
test = [r for r in records if r["split"] == "test"]
assert [r["step"] for r in train] == [5, 10, 15, 20], [r["step"] for r in train]
assert train[-1]["loss"] < train[0]["loss"], (train[0]["loss"], train[-1]["loss"])
assert test and test[0]["bpc"] > 0, test
print(f"container run ok: loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}, test bpc {test[0]['bpc']:.3f}")
EOF
  echo "run took $((SECONDS - t)) s"
fi
echo "build_cpu_image: done in $((SECONDS - started)) s"
