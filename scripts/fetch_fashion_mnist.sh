#!/usr/bin/env bash
# Make Fashion-MNIST available offline and print the directory holding the *.gz files.
# Prefers the installed Debian package; otherwise unpacks its .deb (no root needed) under data/raw/.
# Idempotent: does nothing when the files are already there.
set -euo pipefail

INSTALLED=/usr/share/datasets/fashion-mnist
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/data/raw/fashion-mnist"
FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"

have_all() {
  for f in $FILES; do [ -s "$1/$f" ] || return 1; done
}

if have_all "$INSTALLED"; then echo "$INSTALLED"; exit 0; fi
UNPACKED="$DEST/usr/share/datasets/fashion-mnist"
if have_all "$UNPACKED"; then echo "$UNPACKED"; exit 0; fi

mkdir -p "$DEST"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && { apt-get download dataset-fashion-mnist >&2 || { apt-get update >&2 && apt-get download dataset-fashion-mnist >&2; }; })
dpkg-deb -x "$TMP"/dataset-fashion-mnist_*.deb "$DEST"
have_all "$UNPACKED" || { echo "dataset-fashion-mnist unpacked but files missing under $UNPACKED" >&2; exit 1; }
echo "$UNPACKED"
