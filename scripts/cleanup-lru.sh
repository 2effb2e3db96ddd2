#!/usr/bin/env bash
# cleanup-lru.sh: when the workspace volume is at or above MAX_VOLUME_USAGE_PERCENT (85), evict
# least-recently-used branches until it is at TARGET_VOLUME_USAGE_PERCENT (70). Unlike the
# original script, a branch is deleted only after a verified push to object storage, and never
# while a workflow, a stream subscriber or a recent use holds it. Prints CLEANUP_STATUS=
# success|failed, USAGE_BEFORE, USAGE_AFTER, EVICTED, SKIPPED and FAILED; exits non-zero while
# the volume stays at or above the maximum. Works whether or not the server is running.
set -euo pipefail
[ $# -eq 0 ] || { echo "usage: $0" >&2; exit 2; }
exec "${WELDR_AGENT_BIN:-weldr-agent}" cleanup
