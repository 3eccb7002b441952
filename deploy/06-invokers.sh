#!/usr/bin/env bash
# 06-invokers.sh: who may call which function (roles/run.invoker, per function).
#
#   WORKER_FUNCTION   TASKS_SA only (Cloud Tasks' OIDC identity)
#   CLEANUP_FUNCTION  SCHEDULER_SA only (Cloud Scheduler's OIDC identity)
#   ENQUEUE_FUNCTION  the members in ENQUEUE_INVOKERS (comma-separated, e.g.
#                     serviceAccount:api@p.iam.gserviceaccount.com,group:ops@example.com); none by default
#   EXTRA_FUNCTIONS   the members in EXTRA_INVOKERS, on each; none by default
#                     (PUBLIC_FUNCTIONS among them are open to anyone: allUsers,
#                     granted by 05-functions.sh with --allow-unauthenticated)
#
# With DEPLOY_WITH=functions: gcloud functions add-invoker-policy-binding; with
# DEPLOY_WITH=run: gcloud run services add-iam-policy-binding on the function's
# service. Both are idempotent. Nothing is granted project-wide.
# Usage: deploy/06-invokers.sh [--dry-run]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ENQUEUE_MEMBERS and EXTRA_MEMBERS were checked by lib.sh before any step
# ran; one member a line. PUBLIC_FUNCTIONS were deployed
# --allow-unauthenticated (allUsers) by 05-functions.sh.

grant_invoker "$WORKER_FUNCTION" "serviceAccount:$TASKS_SA_EMAIL"
grant_invoker "$CLEANUP_FUNCTION" "serviceAccount:$SCHEDULER_SA_EMAIL"
while IFS= read -r member; do
  [[ -z "$member" ]] || grant_invoker "$ENQUEUE_FUNCTION" "$member" </dev/null
done <<<"$ENQUEUE_MEMBERS"
for name in "${EXTRA[@]}"; do
  while IFS= read -r member; do
    [[ -z "$member" ]] || grant_invoker "$name" "$member" </dev/null
  done <<<"$EXTRA_MEMBERS"
done
