#!/usr/bin/env bash
# 02-datastore.sh: the Datastore-mode database, and optionally TTL policies on the locks' and wait records' expiry.
#
# Creates the database when it is missing (an existing one is kept; it must be
# in Datastore mode). With ENABLE_TTL=1 (default) sets a TTL policy on the
# expiresAt property of the lock kind: Google then deletes expired lock entities,
# typically within 24 hours of expiry. That is garbage collection only: lock
# correctness never depends on it, and CleanupLocks remains the primary cleanup.
# It sets one on each kind of park mode's wait list (package tasks/dswait:
# TaskguardWaitRecord, TaskguardWaitRun, TaskguardWaitBody, TaskguardWaitWake)
# too: their expiresAt is the dedup window after a record finished, or 30 days
# after it was last written; the TTL is garbage collection, never read.
# Setting the same TTL policy again changes nothing.
# Usage: deploy/02-datastore.sh [--dry-run]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

db=(--database="$DATASTORE_DATABASE_ID" --project="$PROJECT")
if exists gcloud firestore databases describe "${db[@]}"; then
  type="$(capture DATASTORE_MODE gcloud firestore databases describe "${db[@]}" --format='value(type)')"
  [[ "$type" == DATASTORE_MODE ]] || die "database $DATASTORE_DATABASE_ID is $type, not DATASTORE_MODE; choose another TASKGUARD_DATASTORE_DATABASE"
  note "database $DATASTORE_DATABASE_ID exists"
else
  run gcloud firestore databases create "${db[@]}" --location="$DATASTORE_LOCATION" --type=datastore-mode
fi

if [[ "$ENABLE_TTL" == 1 ]]; then
  run gcloud firestore fields ttls update expiresAt --collection-group="$TASKGUARD_DATASTORE_KIND" \
    --enable-ttl --async "${db[@]}"
  for kind in "${WAIT_KINDS[@]}"; do
    run gcloud firestore fields ttls update expiresAt --collection-group="$kind" \
      --enable-ttl --async "${db[@]}"
  done
fi
