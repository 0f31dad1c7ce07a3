#!/usr/bin/env bash
# Schemathesis against the real server binary, driven by the committed openapi/openapi.json:
# `--checks all`, every operation, with an API key on the API and the admin token on /admin.
# Usage: tests/schemathesis/run.sh BINARY VENV [MAX_EXAMPLES]
# Exclusions (and why) are in tests/schemathesis/README.md; the config is schemathesis.toml here.
set -euo pipefail
binary="$(realpath "$1")"; venv="$2"; max_examples="${3:-60}"
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
work="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
export FEWSTEP_STORE_URL="sqlite://$work/log.db"
export FEWSTEP_API_KEYS='[st-key]'
export FEWSTEP_ADMIN_TOKEN=st-admin
(cd "$root" && exec "$binary" serve --addr "127.0.0.1:$port" --models tiny-shapes) >"$work/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
ready() { python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
    "http://127.0.0.1:$port/ready" >/dev/null 2>&1; }
for _ in $(seq 1 240); do ready && break; sleep 0.5; done
ready || { cat "$work/server.log"; exit 1; }
st() {
    (cd "$work" && "$venv/bin/schemathesis" --config-file "$here/schemathesis.toml" \
        run "$root/openapi/openapi.json" \
        --url "http://127.0.0.1:$port" --checks all --max-examples "$max_examples" \
        --request-timeout 30 --generation-deterministic --workers 1 "$@")
}
status=0
st --exclude-path-regex '^/admin' -H 'Authorization: Bearer st-key' || status=$?
st --include-path-regex '^/admin' -H 'Authorization: Bearer st-admin' || status=$?
if [ "$status" -ne 0 ]; then tail -50 "$work/server.log"; fi
exit "$status"
