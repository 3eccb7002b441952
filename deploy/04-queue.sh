#!/usr/bin/env bash
# 04-queue.sh: the Cloud Tasks queue with its retry settings, and who may enqueue.
#
# Creates the queue, or updates an existing one to the configured settings.
# A task whose lock is busy is answered with a retryable status, so the retry
# settings decide how long a job waits for its lock: keep QUEUE_MAX_BACKOFF at
# or above TASKGUARD_LEASE so that retries outlast a dead holder's lease.
# Grants roles/cloudtasks.enqueuer on this queue only to the accounts that
# create tasks: ENQUEUE_SA (Enqueue), WORKER_SA (park mode's continuations)
# and EXTRA_SA (your functions enqueue). The tasks' dispatch deadline is set
# per task by the code that creates it, from TASKGUARD_TASK_DEADLINE
# (TASK_DEADLINE); a queue has no such setting.
# Usage: deploy/04-queue.sh [--dry-run]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

settings=(
  --location="$QUEUE_LOCATION"
  --max-attempts="$QUEUE_MAX_ATTEMPTS"
  --max-retry-duration="$QUEUE_MAX_RETRY_DURATION"
  --min-backoff="$QUEUE_MIN_BACKOFF"
  --max-backoff="$QUEUE_MAX_BACKOFF"
  --max-doublings="$QUEUE_MAX_DOUBLINGS"
  --max-dispatches-per-second="$QUEUE_MAX_DISPATCHES_PER_SECOND"
  --max-concurrent-dispatches="$QUEUE_MAX_CONCURRENT_DISPATCHES"
  --project="$PROJECT"
)
if exists gcloud tasks queues describe "$QUEUE" --location="$QUEUE_LOCATION" --project="$PROJECT"; then
  run gcloud tasks queues update "$QUEUE" "${settings[@]}"
else
  run gcloud tasks queues create "$QUEUE" "${settings[@]}"
fi

creators=("$WORKER_SA_EMAIL")
[[ "$ENQUEUE_FUNCTION" == none ]] || creators+=("$ENQUEUE_SA_EMAIL")
[[ ${#EXTRA[@]} -eq 0 ]] || creators+=("$EXTRA_SA_EMAIL")
for email in "${creators[@]}"; do
  run_retry gcloud tasks queues add-iam-policy-binding "$QUEUE" --location="$QUEUE_LOCATION" \
    --member="serviceAccount:$email" --role=roles/cloudtasks.enqueuer --project="$PROJECT" --format=none
done
