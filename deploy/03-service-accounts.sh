#!/usr/bin/env bash
# 03-service-accounts.sh: one service account per function, the accounts of
# Cloud Tasks and Cloud Scheduler, and their project-level and account-level grants.
#
#   WORKER_SA     runs the Worker: roles/datastore.user (its locks and park
#                 mode's wait list); roles/cloudtasks.enqueuer on the queue
#                 (04-queue.sh) and roles/iam.serviceAccountUser on TASKS_SA
#                 only, for the continuations it creates in park mode (tasks
#                 that carry OIDC tokens for TASKS_SA: actAs).
#   ENQUEUE_SA    runs Enqueue (unless ENQUEUE_FUNCTION=none): the enqueuer
#                 role on the queue and actAs on TASKS_SA; no Datastore.
#   CLEANUP_SA    runs CleanupLocks: roles/datastore.user only.
#   EXTRA_SA      runs EXTRA_FUNCTIONS (when there are any): as the Worker,
#                 since your functions lock and may enqueue.
#   TASKS_SA      the identity Cloud Tasks presents to Worker (run.invoker on Worker only, 06-invokers.sh).
#   SCHEDULER_SA  the identity Cloud Scheduler presents to CleanupLocks (run.invoker on it only, 06-invokers.sh).
#
# roles/datastore.user is granted on the project, limited by an IAM condition
# to TASKGUARD_DATASTORE_DATABASE when taskguard has a database of its own;
# on the (default) database it is unconditional. Functions that take Weak
# locks (Worker, EXTRA_FUNCTIONS) may read the Valkey secrets
# (roles/secretmanager.secretAccessor on each secret only) and, with
# VALKEY_IAM_AUTH=true, connect to Memorystore (roles/memorystore.dbConnectionUser).
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

ensure_sa "$WORKER_SA" "taskguard Worker" "Runs the taskguard Worker function"
[[ "$ENQUEUE_FUNCTION" == none ]] || ensure_sa "$ENQUEUE_SA" "taskguard Enqueue" "Runs the taskguard Enqueue function"
ensure_sa "$CLEANUP_SA" "taskguard CleanupLocks" "Runs the taskguard CleanupLocks function"
[[ ${#EXTRA[@]} -eq 0 ]] || ensure_sa "$EXTRA_SA" "taskguard extra functions" "Runs the functions of EXTRA_FUNCTIONS"
ensure_sa "$TASKS_SA" "taskguard task invoker" "Identity of Cloud Tasks calling the taskguard Worker"
ensure_sa "$SCHEDULER_SA" "taskguard scheduler invoker" "Identity of Cloud Scheduler calling taskguard CleanupLocks"

# Who reads and writes Datastore, who creates tasks, who takes Weak locks.
datastore_users=("$WORKER_SA_EMAIL" "$CLEANUP_SA_EMAIL")
task_creators=("$WORKER_SA_EMAIL")
weak_users=("$WORKER_SA_EMAIL")
[[ "$ENQUEUE_FUNCTION" == none ]] || task_creators+=("$ENQUEUE_SA_EMAIL")
if [[ ${#EXTRA[@]} -gt 0 ]]; then
  datastore_users+=("$EXTRA_SA_EMAIL") task_creators+=("$EXTRA_SA_EMAIL") weak_users+=("$EXTRA_SA_EMAIL")
fi

condition=None
if [[ -n "$TASKGUARD_DATASTORE_DATABASE" ]]; then
  condition="expression=resource.name == \"projects/$PROJECT/databases/$TASKGUARD_DATASTORE_DATABASE\",title=taskguard database $TASKGUARD_DATASTORE_DATABASE only"
fi
for email in "${datastore_users[@]}"; do
  run_retry gcloud projects add-iam-policy-binding "$PROJECT" \
    --member="serviceAccount:$email" --role=roles/datastore.user --condition="$condition" --format=none
done

for email in "${task_creators[@]}"; do
  run_retry gcloud iam service-accounts add-iam-policy-binding "$TASKS_SA_EMAIL" \
    --member="serviceAccount:$email" --role=roles/iam.serviceAccountUser --project="$PROJECT" --format=none
done

for secret in "${SECRETS[@]}"; do
  for email in "${weak_users[@]}"; do
    run_retry gcloud secrets add-iam-policy-binding "$secret" \
      --member="serviceAccount:$email" --role=roles/secretmanager.secretAccessor --project="$PROJECT" --format=none
  done
done
if [[ "$VALKEY_IAM_AUTH" == true ]]; then
  for email in "${weak_users[@]}"; do
    run_retry gcloud projects add-iam-policy-binding "$PROJECT" \
      --member="serviceAccount:$email" --role=roles/memorystore.dbConnectionUser --condition=None --format=none
  done
fi
