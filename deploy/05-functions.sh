#!/usr/bin/env bash
# 05-functions.sh: deploy the functions (gen2, private): WORKER_FUNCTION,
# ENQUEUE_FUNCTION (unless none), CLEANUP_FUNCTION and EXTRA_FUNCTIONS, from
# the module in SOURCE_DIR, and optionally give them Direct VPC egress for
# Memorystore.
#
# DEPLOY_WITH=functions (the default): `gcloud functions deploy`, which creates
# or updates, so rerunning redeploys the same configuration. DEPLOY_WITH=run:
# `gcloud run deploy SERVICE --function=NAME --base-image=RUNTIME`, the same
# function deployed as a Cloud Run service (its name in lower case), with the
# VPC flags in the same call. All run as RUNTIME_SA, refuse unauthenticated
# calls, and receive the same environment (the names package app reads).
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
#   extras        the TIMEOUT of NAME:TIMEOUT in EXTRA_FUNCTIONS (60s).
#
# TASKGUARD_WORKER_URL defaults to the Worker's deterministic Cloud Run URL,
# https://SERVICE-PROJECT_NUMBER.REGION.run.app, known before the first deploy.
#
# Direct VPC egress (VPC_NETWORK and VPC_SUBNET set): gcloud functions deploy
# (SDK 528) has no --network/--subnet flags, so with DEPLOY_WITH=functions it is
# applied to each function's Cloud Run service with `gcloud run services
# update`, after every deploy; DEPLOY_WITH=run needs no second step.
# Usage: deploy/05-functions.sh [--dry-run]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ -z "$TASKGUARD_WORKER_URL" ]]; then
  number="$(project_number)"
  TASKGUARD_WORKER_URL="https://$(service_name "$WORKER_FUNCTION")-${number}.${REGION}.run.app"
fi
env_vars="$(functions_env "$TASKGUARD_WORKER_URL")"

common=(
  --region="$REGION"
  --source="$SOURCE_DIR"
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
  if [[ "$DEPLOY_WITH" == run ]]; then
    local vpc=()
    if [[ -n "$VPC_NETWORK" ]]; then
      vpc=(--network="$VPC_NETWORK" --subnet="$VPC_SUBNET" --vpc-egress=private-ranges-only)
    fi
    run gcloud run deploy "$(service_name "$1")" --function="$1" --base-image="$RUNTIME" --timeout="$2" \
      "${common[@]}" "${vpc[@]}"
    return
  fi
  run gcloud functions deploy "$1" --gen2 --runtime="$RUNTIME" --trigger-http --entry-point="$1" --timeout="$2" "${common[@]}"
  if [[ -n "$VPC_NETWORK" ]]; then
    run gcloud run services update "$(service_name "$1")" --region="$REGION" --project="$PROJECT" \
      --network="$VPC_NETWORK" --subnet="$VPC_SUBNET" --vpc-egress=private-ranges-only
  fi
}

for f in "${FUNCTIONS[@]}"; do
  deploy_function ${f}
done
