#!/usr/bin/env bash
# Idempotent set-up: Debian packages, .venv with pinned deps (torch pinned by constraints.txt).
# Called by `make setup`; safe to re-run; a finished set-up is recorded in .venv/.setup-done.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.setup-done
inputs="requirements.txt constraints.txt setup.py scripts/setup.sh"
if [ -f "$stamp" ] && [ "$(cat $inputs | sha256sum)" = "$(cat "$stamp")" ]; then
  exit 0
fi

apt_pkgs="espeak-ng flite sox libsox-fmt-all slurmctld slurmd slurm-client munge slurmdbd mariadb-server prometheus"
missing=""
for p in $apt_pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "[setup] apt-get install$missing"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  # The SLURM, MariaDB and Prometheus packages would start system-wide daemons on install (and fail
  # without an init system); the project starts its own under a temp dir (scripts/slurm_local.sh), so
  # tell invoke-rc.d not to start services during this install, as container images do.
  added_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    added_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
  [ -z "$added_policy" ] || $SUDO rm -f /usr/sbin/policy-rc.d
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# The machine's pip config lists local indexes that lack most packages: drop pip's notes about them.
pipi() { { .venv/bin/python -m pip install -q -c constraints.txt "$@" 2>&1; } | { grep -v "is ignored: it is neither" || true; }; }
pipi -r requirements.txt
# torchaudio: no CPU build exists; 2.11.0 without deps works for its pure-PyTorch transforms once its
# CUDA-linked extension libraries are removed (see README "Installs"). We use only those transforms.
pipi --no-deps torchaudio==2.11.0
rm -f .venv/lib/python3*/site-packages/torchaudio/lib/*.so
# tinysoundfont renders the instrument corpus; its pyaudio dependency is not needed and does not build.
pipi --no-deps tinysoundfont
pipi --no-deps -e .
.venv/bin/python -c "import torch, torchaudio, deepspeed, faiss, webdataset, soundfile; assert torch.__version__.startswith('2.13.0'), torch.__version__"
cat $inputs | sha256sum > "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
