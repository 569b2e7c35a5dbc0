#!/bin/sh
# Container entrypoint for the mixer service.
#   - no arguments, or only options (starting with "-"): run `mixer serve` on 0.0.0.0:8000 with the
#     fixed data layout, adding `--redis-url "$MIXER_REDIS_URL"` when that variable is set, then
#     any options given (e.g. `docker run IMAGE --log-level debug`);
#   - anything else is run as a command (e.g. `docker run IMAGE mixer --help`).
# Binding to 0.0.0.0 requires MIXER_OPERATOR_TOKEN and MIXER_READER_TOKEN (the service checks).
set -eu

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

if [ -n "${MIXER_REDIS_URL:-}" ]; then
    set -- --redis-url "$MIXER_REDIS_URL" "$@"
fi

exec mixer serve \
    --host 0.0.0.0 \
    --port 8000 \
    --sources-dir /data/sources \
    --state-dir /data/state \
    "$@"
