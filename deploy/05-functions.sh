#!/usr/bin/env bash
# 05-functions.sh: deploy the functions (gen2): WORKER_FUNCTION,
# ENQUEUE_FUNCTION (unless none), CLEANUP_FUNCTION and EXTRA_FUNCTIONS, from
# the module in SOURCE_DIR, each as its own service account, with one
# instance profile, and optionally Direct VPC egress for Memorystore.
#
# DEPLOY_WITH=functions (the default): `gcloud functions deploy`, which creates
# or updates, so rerunning redeploys the same configuration; the settings it
# has no flag for (billing, Direct VPC egress) are applied to the function's
# Cloud Run service with `gcloud run services update` right after, on every
# run. DEPLOY_WITH=run: `gcloud run deploy SERVICE --function=NAME
# --base-image=RUNTIME`, the same function deployed as a Cloud Run service
# (its name in lower case), everything in one call. Either way every function
# gets the same profile:
#
#   --cpu=CPU --memory=MEMORY --concurrency=CONCURRENCY   (1 vCPU, 512Mi, 80)
#   billing BILLING: request (--cpu-throttling) or instance (--no-cpu-throttling)
#   --min-instances: WORKER_MIN_INSTANCES for the Worker, 0 for the others
#   ingress: TARGET_INGRESS (internal) for Worker and CleanupLocks, which only
#            Cloud Tasks and Cloud Scheduler of PROJECT call; ENDPOINT_INGRESS
#            (all) for Enqueue and EXTRA_FUNCTIONS
#   --no-allow-unauthenticated, except PUBLIC_FUNCTIONS (--allow-unauthenticated)
#
# and the same environment (the names package app reads; the Weak-lock
# settings and the Valkey secrets only where Weak locks are taken: the Worker
# and EXTRA_FUNCTIONS).
#
# Timeouts:
#   Worker        WORKER_TIMEOUT, by default TASK_DEADLINE (1800s), the tasks'
#                 dispatch deadline, which the functions read as
#                 TASKGUARD_TASK_DEADLINE: Cloud Tasks and the platform give
#                 up on an attempt at the same time, and the Worker's jobs end
#                 before both. A WORKER_TIMEOUT below TASK_DEADLINE is refused.
#   CleanupLocks  CLEANUP_TIMEOUT (600s) >= SCHEDULER_ATTEMPT_DEADLINE (same by
#                 default); the cleanup stops within its request deadline and
#                 reports whether it finished; the next day's run continues.
#   Enqueue       ENQUEUE_TIMEOUT (60s): it only creates a task.
#   extras        the TIMEOUT of NAME:TIMEOUT in EXTRA_FUNCTIONS (60s).
#
# TASKGUARD_WORKER_URL defaults to the Worker's deterministic Cloud Run URL,
# https://SERVICE-PROJECT_NUMBER.REGION.run.app, known before the first deploy.
#
# gcloud functions deploy (SDK 528) has no --network/--subnet nor billing
# flags; DEPLOY_WITH=run needs no second step.
# Usage: deploy/05-functions.sh [--dry-run]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ -z "$TASKGUARD_WORKER_URL" ]]; then
  number="$(project_number)"
  TASKGUARD_WORKER_URL="https://$(service_name "$WORKER_FUNCTION")-${number}.${REGION}.run.app"
fi

common=(
  --region="$REGION"
  --source="$SOURCE_DIR"
  --cpu="$CPU"
  --memory="$MEMORY"
  --concurrency="$CONCURRENCY"
  --project="$PROJECT"
)
if [[ -n "$MAX_INSTANCES" ]]; then
  common+=(--max-instances="$MAX_INSTANCES")
fi
if [[ -n "$BUILD_SERVICE_ACCOUNT" ]]; then
  common+=(--build-service-account="projects/$PROJECT/serviceAccounts/$BUILD_SERVICE_ACCOUNT")
fi
billing=(--cpu-throttling)
[[ "$BILLING" == instance ]] && billing=(--no-cpu-throttling)
vpc=()
if [[ -n "$VPC_NETWORK" ]]; then
  vpc=(--network="$VPC_NETWORK" --subnet="$VPC_SUBNET" --vpc-egress=private-ranges-only)
fi

deploy_function() { # name timeout role
  local name="$1" timeout="$2" role="$3" ingress min=0 auth=--no-allow-unauthenticated
  local own=(--timeout="$timeout" --service-account="$(sa_of "$role")"
    --set-env-vars="$(functions_env "$TASKGUARD_WORKER_URL" "$role")")
  ingress="$(ingress_of "$role")"
  [[ "$role" == worker ]] && min="$WORKER_MIN_INSTANCES"
  own+=(--min-instances="$min")
  is_public "$name" && auth=--allow-unauthenticated
  if weak_locks "$role" && [[ -n "$FUNCTION_SECRETS" ]]; then
    own+=(--set-secrets="$FUNCTION_SECRETS")
  fi
  if [[ "$DEPLOY_WITH" == run ]]; then
    run gcloud run deploy "$(service_name "$name")" --function="$name" --base-image="$RUNTIME" \
      "${own[@]}" "${common[@]}" "$auth" --ingress="$ingress" "${billing[@]}" "${vpc[@]}"
    return
  fi
  case "$ingress" in
    internal) ingress=internal-only ;;
    internal-and-cloud-load-balancing) ingress=internal-and-gclb ;;
  esac
  run gcloud functions deploy "$name" --gen2 --runtime="$RUNTIME" --trigger-http --entry-point="$name" \
    "${own[@]}" "${common[@]}" "$auth" --ingress-settings="$ingress"
  run gcloud run services update "$(service_name "$name")" --region="$REGION" --project="$PROJECT" \
    "${billing[@]}" "${vpc[@]}"
}

for f in "${FUNCTIONS[@]}"; do
  deploy_function ${f}
done
