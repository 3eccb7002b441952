#!/usr/bin/env bash
# 04-queue.sh: the Cloud Tasks queue with its retry settings, and who may enqueue.
#
# Creates the queue, or updates an existing one to the configured settings.
# A task whose lock is busy is answered with a retryable status, so the retry
# settings decide how long a job waits for its lock: keep QUEUE_MAX_BACKOFF at
# or above TASKGUARD_LEASE so that retries outlast a dead holder's lease.
# Grants RUNTIME_SA roles/cloudtasks.enqueuer on this queue only: Enqueue creates
# tasks on it, and so does the Worker in park mode (its continuations).
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

run_retry gcloud tasks queues add-iam-policy-binding "$QUEUE" --location="$QUEUE_LOCATION" \
  --member="serviceAccount:$RUNTIME_SA_EMAIL" --role=roles/cloudtasks.enqueuer --project="$PROJECT" --format=none
