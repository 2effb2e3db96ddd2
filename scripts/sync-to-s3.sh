#!/usr/bin/env bash
# sync-to-s3.sh <branchId> <projectId>: push the branch directory as a new snapshot.
# Prints SYNC_STATUS=success|failed and BUCKET_NAME=<bucket>, like the original script; exits
# non-zero on failure. Works whether or not the server is running.
# The arguments keep the original script's order; the CLI takes <projectId> <branchId>.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 <branchId> <projectId>" >&2; exit 2; }
exec "${WELDR_AGENT_BIN:-weldr-agent}" sync push "$2" "$1"
