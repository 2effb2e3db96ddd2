#!/usr/bin/env bash
# create-branch-dir.sh <branchId> <projectId>: create or reuse a branch directory.
# Prints STATUS=created|reused and BRANCH_DIR=<path>, like the original script. Works whether
# or not the server is running (the CLI talks to it over its control socket).
# The arguments keep the original script's order; the CLI takes <projectId> <branchId>.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 <branchId> <projectId>" >&2; exit 2; }
exec "${WELDR_AGENT_BIN:-weldr-agent}" branch create "$2" "$1"
