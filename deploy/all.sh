#!/usr/bin/env bash
# all.sh: run every deploy step in order. Rerunnable: each step creates what is
# missing and brings what exists to the configured state.
#
# Usage: deploy/all.sh [--dry-run]   (configuration: see deploy/README.md)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

steps=(
  01-apis.sh
  02-datastore.sh
  03-service-accounts.sh
  04-queue.sh
  05-functions.sh
  06-invokers.sh
  07-scheduler.sh
)
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
for step in "${steps[@]}"; do
  note "== $step"
  bash "$here/$step" "$@"
done
is_dry_run || note "done: functions deployed in $REGION for project $PROJECT"
