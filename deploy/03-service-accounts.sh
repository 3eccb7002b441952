#!/usr/bin/env bash
# 03-service-accounts.sh: the three service accounts and their project-level grants.
#
#   RUNTIME_SA    runs all three functions: roles/datastore.user on the project
#                 (queue-level roles/cloudtasks.enqueuer is granted by 04-queue.sh),
#                 and roles/iam.serviceAccountUser on TASKS_SA only, because it
#                 creates tasks that carry OIDC tokens for TASKS_SA (actAs): Enqueue's
#                 tasks, and the Worker's continuations in park mode (hand-offs
#                 and safety nets of parked tasks).
#   TASKS_SA      the identity Cloud Tasks presents to Worker (run.invoker on Worker only, 06-invokers.sh).
#   SCHEDULER_SA  the identity Cloud Scheduler presents to CleanupLocks (run.invoker on it only, 06-invokers.sh).
#
# Accounts are created only when missing; add-iam-policy-binding is idempotent.
# Usage: deploy/03-service-accounts.sh [--dry-run]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_sa() { # id display-name description
  if exists gcloud iam service-accounts describe "$(sa_email "$1")" --project="$PROJECT"; then
    note "service account $(sa_email "$1") exists"
    return
  fi
  run gcloud iam service-accounts create "$1" --display-name="$2" --description="$3" --project="$PROJECT"
}

ensure_sa "$RUNTIME_SA" "taskguard runtime" "Runs the taskguard functions"
ensure_sa "$TASKS_SA" "taskguard task invoker" "Identity of Cloud Tasks calling the taskguard Worker"
ensure_sa "$SCHEDULER_SA" "taskguard scheduler invoker" "Identity of Cloud Scheduler calling taskguard CleanupLocks"

run_retry gcloud projects add-iam-policy-binding "$PROJECT" \
  --member="serviceAccount:$RUNTIME_SA_EMAIL" --role=roles/datastore.user --condition=None --format=none

run_retry gcloud iam service-accounts add-iam-policy-binding "$TASKS_SA_EMAIL" \
  --member="serviceAccount:$RUNTIME_SA_EMAIL" --role=roles/iam.serviceAccountUser --project="$PROJECT" --format=none
