#!/bin/sh
# Fetch the optional validators used by tests/deploy/test_deploy.py -- promtool (Debian's `prometheus`
# package) and nginx -- into deploy/.tools/ without installing anything system-wide.
# Needs apt-get and dpkg-deb (Debian/Ubuntu) and access to the Debian archive; run `apt-get update`
# first on a fresh machine. The tests skip those checks (with a reason) when the tools are absent.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
dest="$here/.tools"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$dest"
cd "$work"
for pkg in prometheus nginx; do
    apt-get download "$pkg"
done
for deb in ./*.deb; do
    dpkg-deb -x "$deb" "$dest"
done
"$dest/usr/bin/promtool" --version 2>&1 | head -n 1
"$dest/usr/sbin/nginx" -v
echo "tools extracted under $dest (promtool: usr/bin/promtool, nginx: usr/sbin/nginx)"
