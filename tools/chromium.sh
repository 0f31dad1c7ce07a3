#!/usr/bin/env bash
# Installs Debian's chromium (if missing) and prints its path: the browser that the playground's
# test (tests/browser/playground.py) drives through Playwright, which never downloads one of its
# own here. Used by .ci/run; needs root for apt-get, as tools/test-postgres.sh does.
set -euo pipefail
{
    if ! command -v chromium >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
    fi
} >&2
command -v chromium
