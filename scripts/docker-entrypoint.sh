#!/bin/sh
# The image's entrypoint (Dockerfile): `stella ARGS`, after a note for each mounted folder that this user cannot write
# to (a host folder owned by another uid, or one Docker created as root), saying how to run as its owner.
for dir in /data /runs; do
  if [ ! -w "$dir" ] && ! grep -qs "^[^ ]* $dir [^ ]* ro[ ,]" /proc/mounts; then
    echo "note: $dir (owner uid $(stat -c %u "$dir")) is not writable by uid $(id -u): run as the host folder's" \
         "owner, docker run --user \"\$(id -u):\$(id -g)\" ... (README \"Docker\")" >&2
  fi
done
exec stella "$@"
