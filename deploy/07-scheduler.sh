#!/usr/bin/env bash
# 07-scheduler.sh: the daily Cloud Scheduler job that calls CLEANUP_FUNCTION
# (CleanupLocks) with an OIDC token.
#
# Creates the job, or updates an existing one to the configured settings. The
# token is minted for SCHEDULER_SA with the function's URL as audience.
# Cloud Scheduler does not retry unless told: SCHEDULER_MAX_RETRY_ATTEMPTS (3).
# Usage: deploy/07-scheduler.sh [--dry-run]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

url="$(function_url "$CLEANUP_FUNCTION")"
[[ -n "$url" ]] || die "$CLEANUP_FUNCTION has no URL; run 05-functions.sh first"

settings=(
  --location="$SCHEDULER_LOCATION"
  --schedule="$SCHEDULE"
  --time-zone="$SCHEDULE_TIME_ZONE"
  --uri="$url"
  --http-method=POST
  --message-body='{}'
  --oidc-service-account-email="$SCHEDULER_SA_EMAIL"
  --oidc-token-audience="$url"
  --attempt-deadline="$SCHEDULER_ATTEMPT_DEADLINE"
  --max-retry-attempts="$SCHEDULER_MAX_RETRY_ATTEMPTS"
  --project="$PROJECT"
)
if exists gcloud scheduler jobs describe "$SCHEDULER_JOB" --location="$SCHEDULER_LOCATION" --project="$PROJECT"; then
  run gcloud scheduler jobs update http "$SCHEDULER_JOB" "${settings[@]}" --update-headers=Content-Type=application/json
else
  run gcloud scheduler jobs create http "$SCHEDULER_JOB" "${settings[@]}" --headers=Content-Type=application/json
fi
