#!/usr/bin/env bash
# What the tests need beyond Python packages: PostgreSQL's server binaries (the concurrency tests run
# an MLflow server on a real PostgreSQL, the cluster's tracking store). Installed from Debian's
# packages when missing and this is root; otherwise says what to install.
set -euo pipefail
find_initdb() { command -v initdb || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1; }
if [ -z "$(find_initdb)" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
        echo "test-deps: PostgreSQL is missing: install Debian's postgresql package" >&2
        exit 1
    fi
fi
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    echo "test-deps: running as root, PostgreSQL needs a 'postgres' user to run as (Debian's package makes it)" >&2
    exit 1
fi
echo "test dependencies: $(find_initdb)"
