#!/usr/bin/env bash
# Installs PostgreSQL from Debian's packages (if missing), starts its cluster on loopback and
# prints the URL the tests read from POSTGRES_TEST_URL. Used by .ci/run; run it
# yourself (as root) to include the PostgreSQL half of `cargo test`:
#   export POSTGRES_TEST_URL=$(tools/test-postgres.sh)
set -euo pipefail
{
    if ! command -v pg_lsclusters >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq postgresql >/dev/null
    fi
    read -r version cluster port status _ < <(pg_lsclusters -h | head -n1)
    if [ "$status" != "online" ]; then
        pg_ctlcluster "$version" "$cluster" start
    fi
    su postgres -c "psql -q -p $port -c \"ALTER USER postgres PASSWORD 'postgres'\""
} >&2
echo "postgres://postgres:postgres@127.0.0.1:${port}/postgres"
