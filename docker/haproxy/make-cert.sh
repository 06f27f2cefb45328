#!/bin/sh
# Create a self-signed EXAMPLE certificate for HAProxy's TLS listener, only when none is there yet:
# one PEM file holding the certificate and its private key (the form HAProxy's `crt` wants),
# CN=localhost with subjectAltName localhost and 127.0.0.1, valid for 825 days.
#
# Browsers and SDKs do not trust it: it only lets the wss:// listener start. For anything real,
# mount your own PEM (certificate chain + key) at /certs/herald.pem instead.
#
#   make-cert.sh [OUT]            OUT defaults to /certs/herald.pem
# env: CERT_OWNER=uid:gid         chown the file (docker/compose.yml: HAProxy's image runs as 99:99)
#
# POSIX sh: it runs in alpine/openssl (busybox sh) under docker/compose.yml and on the host in
# docker/run-local.sh and scripts/check-deploy.
set -eu
out=${1:-/certs/herald.pem}

# An existing file is kept, so restarting the stack keeps its certificate (and one you put there).
if [ -s "$out" ]; then
  echo "make-cert: keeping the existing $out"
  exit 0
fi

dir=$(dirname "$out")
mkdir -p "$dir"
tmp=$(mktemp -d "$dir/.make-cert.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

openssl req -x509 -newkey rsa:2048 -sha256 -nodes -days 825 \
  -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -addext "extendedKeyUsage=serverAuth" \
  -keyout "$tmp/key.pem" -out "$tmp/cert.pem" 2>"$tmp/openssl.err" \
  || { cat "$tmp/openssl.err" >&2; echo "make-cert: openssl failed" >&2; exit 1; }
cat "$tmp/cert.pem" "$tmp/key.pem" > "$tmp/herald.pem"
# The key is in the file: readable by its owner only.
chmod 600 "$tmp/herald.pem"
if [ -n "${CERT_OWNER:-}" ]; then
  chown "$CERT_OWNER" "$tmp/herald.pem"
fi
# Renamed into place in one step, so a crash never leaves half a PEM that would be "kept".
mv "$tmp/herald.pem" "$out"
echo "make-cert: created an example self-signed certificate (CN=localhost) in $out; replace it with a real one"
