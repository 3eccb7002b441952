#!/usr/bin/env bash
# 05-functions.sh: deploy Worker, Enqueue and CleanupLocks (gen2, private), and
# optionally give them Direct VPC egress for Memorystore.
#
# `gcloud functions deploy` creates or updates, so rerunning redeploys the same
# configuration. All three run as RUNTIME_SA, refuse unauthenticated calls, and
# receive the same environment (the names package app reads).
#
# Timeouts:
#   Worker        WORKER_TIMEOUT (1800s). A task's dispatch deadline is at most
#                 30 min; with the function timeout at or above it, Cloud Tasks
#                 gives up waiting first and retries, and the retry finds the lock
#                 still held (renewed every fraction of TASKGUARD_LEASE), so two
#                 runs of one id never overlap. When a request is cut anyway, its
#                 context ends, renewal stops, and the lock frees itself within
#                 TASKGUARD_LEASE; a straggler is fenced by its older token.
#   CleanupLocks  CLEANUP_TIMEOUT (600s) >= SCHEDULER_ATTEMPT_DEADLINE (same by
#                 default); the cleanup stops within its request deadline and
#                 reports whether it finished; the next day's run continues.
#   Enqueue       ENQUEUE_TIMEOUT (60s): it only creates a task.
#
# TASKGUARD_WORKER_URL defaults to Worker's deterministic Cloud Run URL,
# https://worker-PROJECT_NUMBER.REGION.run.app, known before the first deploy.
#
# Direct VPC egress (VPC_NETWORK and VPC_SUBNET set): gcloud functions deploy
# (SDK 528) has no --network/--subnet flags, so it is applied to each function's
# Cloud Run service with `gcloud run services update`, after every deploy.
# Usage: deploy/05-functions.sh [--dry-run]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ -z "$TASKGUARD_WORKER_URL" ]]; then
  number="$(project_number)"
  TASKGUARD_WORKER_URL="https://$(service_name Worker)-${number}.${REGION}.run.app"
fi
env_vars="$(functions_env "$TASKGUARD_WORKER_URL")"

common=(
  --gen2
  --region="$REGION"
  --runtime="$RUNTIME"
  --source="$SOURCE_DIR"
  --trigger-http
  --no-allow-unauthenticated
  --service-account="$RUNTIME_SA_EMAIL"
  --memory="$MEMORY"
  --set-env-vars="$env_vars"
  --project="$PROJECT"
)
if [[ -n "$MAX_INSTANCES" ]]; then
  common+=(--max-instances="$MAX_INSTANCES")
fi
if [[ -n "$BUILD_SERVICE_ACCOUNT" ]]; then
  common+=(--build-service-account="projects/$PROJECT/serviceAccounts/$BUILD_SERVICE_ACCOUNT")
fi

deploy_function() { # name timeout
  run gcloud functions deploy "$1" --entry-point="$1" --timeout="$2" "${common[@]}"
  if [[ -n "$VPC_NETWORK" ]]; then
    run gcloud run services update "$(service_name "$1")" --region="$REGION" --project="$PROJECT" \
      --network="$VPC_NETWORK" --subnet="$VPC_SUBNET" --vpc-egress=private-ranges-only
  fi
}

deploy_function Worker "$WORKER_TIMEOUT"
deploy_function Enqueue "$ENQUEUE_TIMEOUT"
deploy_function CleanupLocks "$CLEANUP_TIMEOUT"
