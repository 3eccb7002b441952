#!/usr/bin/env bash
# 06-invokers.sh: who may call which function (roles/run.invoker, per function).
#
#   Worker        TASKS_SA only (Cloud Tasks' OIDC identity)
#   CleanupLocks  SCHEDULER_SA only (Cloud Scheduler's OIDC identity)
#   Enqueue       the members in ENQUEUE_INVOKERS (comma-separated, e.g.
#                 serviceAccount:api@p.iam.gserviceaccount.com,group:ops@example.com); none by default
#
# add-invoker-policy-binding is idempotent. Nothing is granted project-wide.
# Usage: deploy/06-invokers.sh [--dry-run]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

run_retry gcloud functions add-invoker-policy-binding Worker --region="$REGION" \
  --member="serviceAccount:$TASKS_SA_EMAIL" --project="$PROJECT" --format=none
run_retry gcloud functions add-invoker-policy-binding CleanupLocks --region="$REGION" \
  --member="serviceAccount:$SCHEDULER_SA_EMAIL" --project="$PROJECT" --format=none

IFS=',' read -r -a members <<<"$ENQUEUE_INVOKERS"
for member in "${members[@]}"; do
  member="${member//[[:space:]]/}"
  [[ -n "$member" ]] || continue
  [[ "$member" =~ ^(user|serviceAccount|group|domain|principal|principalSet):.+ ]] || die "ENQUEUE_INVOKERS: '$member' is not an IAM member (e.g. serviceAccount:EMAIL)"
  run_retry gcloud functions add-invoker-policy-binding Enqueue --region="$REGION" \
    --member="$member" --project="$PROJECT" --format=none
done
