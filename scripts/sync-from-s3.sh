#!/usr/bin/env bash
# sync-from-s3.sh <branchId> <projectId> [--snapshot ID]: restore the latest (or a named)
# snapshot into the branch directory, verifying every content hash.
# Prints SYNC_STATUS=success|skipped|failed, BUCKET_NAME=<bucket> and, with no snapshot yet,
# REASON=bucket_not_found, like the original script; exits non-zero on failure.
# The arguments keep the original script's order; the CLI takes <projectId> <branchId>.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 <branchId> <projectId> [--snapshot ID]" >&2; exit 2; }
exec "${WELDR_AGENT_BIN:-weldr-agent}" sync pull "$2" "$1" "${@:3}"
