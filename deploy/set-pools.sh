#!/bin/sh
# Apply the project's pool limits (migration_assets/core/pools.yaml of the installed package, or the
# file given) to the instance in DAGSTER_HOME.
# Idempotent: run it on every deploy (ECS: a one-off task of the code image; Kubernetes: a Job).
set -eu
file="${1:-$(python -c 'from migration_assets.core.pools import POOLS_FILE; print(POOLS_FILE)')}"
grep -E '^[a-z0-9_]+: *[0-9]+' "$file" | while IFS=': ' read -r pool limit _; do
    dagster instance concurrency set "$pool" "$limit"
done
