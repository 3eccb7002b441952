#!/usr/bin/env bash
# 06-invokers.sh: who may call which function (roles/run.invoker, per function).
#
#   WORKER_FUNCTION   TASKS_SA only (Cloud Tasks' OIDC identity)
#   CLEANUP_FUNCTION  SCHEDULER_SA only (Cloud Scheduler's OIDC identity)
#   ENQUEUE_FUNCTION  the members in ENQUEUE_INVOKERS (comma-separated, e.g.
#                     serviceAccount:api@p.iam.gserviceaccount.com,group:ops@example.com); none by default
#   EXTRA_FUNCTIONS   the members in EXTRA_INVOKERS, on each; none by default
#
# With DEPLOY_WITH=functions: gcloud functions add-invoker-policy-binding; with
# DEPLOY_WITH=run: gcloud run services add-iam-policy-binding on the function's
# service. Both are idempotent. Nothing is granted project-wide.
# Usage: deploy/06-invokers.sh [--dry-run]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Checked before any grant; one member a line.
enqueue_members="$(iam_members ENQUEUE_INVOKERS)"
extra_members="$(iam_members EXTRA_INVOKERS)"

grant_invoker "$WORKER_FUNCTION" "serviceAccount:$TASKS_SA_EMAIL"
grant_invoker "$CLEANUP_FUNCTION" "serviceAccount:$SCHEDULER_SA_EMAIL"
while IFS= read -r member; do
  [[ -z "$member" ]] || grant_invoker "$ENQUEUE_FUNCTION" "$member" </dev/null
done <<<"$enqueue_members"
for name in "${EXTRA[@]}"; do
  while IFS= read -r member; do
    [[ -z "$member" ]] || grant_invoker "$name" "$member" </dev/null
  done <<<"$extra_members"
done
