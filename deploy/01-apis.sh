#!/usr/bin/env bash
# 01-apis.sh: enable the Google APIs taskguard uses.
#
# Idempotent: enabling an API that is already enabled changes nothing.
# Usage: deploy/01-apis.sh [--dry-run]   (configuration: see deploy/README.md)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

apis=(
  cloudfunctions.googleapis.com   # gcloud functions deploy
  run.googleapis.com              # gen2 functions run on Cloud Run
  cloudbuild.googleapis.com        # builds the function from source
  artifactregistry.googleapis.com  # stores the built image
  cloudtasks.googleapis.com
  cloudscheduler.googleapis.com
  datastore.googleapis.com
  firestore.googleapis.com         # database and TTL administration
  iam.googleapis.com
  logging.googleapis.com
)
if [[ -n "$VPC_NETWORK" ]]; then
  apis+=(compute.googleapis.com)   # Direct VPC egress
fi
if [[ ${#SECRETS[@]} -gt 0 ]]; then
  apis+=(secretmanager.googleapis.com)   # the Valkey password and CA
fi
run gcloud services enable "${apis[@]}" --project="$PROJECT"
