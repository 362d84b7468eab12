#!/bin/sh
# Apply the pool limits of deploy/pools.yaml (or the file given) to the instance in DAGSTER_HOME.
# Idempotent: run it on every deploy (ECS: a one-off task of the code image; Kubernetes: a Job).
set -eu
file="${1:-$(dirname "$0")/pools.yaml}"
grep -E '^[a-z0-9_]+: *[0-9]+' "$file" | while IFS=': ' read -r pool limit _; do
    dagster instance concurrency set "$pool" "$limit"
done
