# shellcheck shell=bash
# lib.sh: configuration and helpers shared by every deploy/NN-*.sh script.
#
# Source it; do not run it. It reads the configuration from the environment
# (documented below and in deploy/README.md), fills in the defaults, checks the
# values gcloud itself would only reject once it is talking to Google, and
# defines the helpers that make every script rerunnable and dry-runnable:
#
#   run CMD...                 run CMD, or in a dry run print it (one line, shell-quoted)
#   exists CMD...              run a read-only describe; true when the resource exists
#   capture PLACEHOLDER CMD... print CMD's stdout, or in a dry run print CMD and echo PLACEHOLDER
#
# In a dry run every command goes to stdout as "+ gcloud ...", quoted so that
# the line can be pasted back into a shell; nothing runs, and nothing reads
# the network. Notes and warnings always go to stderr.

set -euo pipefail

# ---- dry run -----------------------------------------------------------------

# DRY_RUN=1 (or --dry-run on any script) prints every command instead of running it.
DRY_RUN="${DRY_RUN:-0}"
for _arg in "$@"; do
  case "$_arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,${/^#/!q;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
    *) echo "$(basename "$0"): unknown argument: $_arg (only --dry-run and --help)" >&2; exit 2 ;;
  esac
done
unset _arg
export DRY_RUN
# DRY_RUN_ASSUME_EXISTS=1 makes a dry run behave as if every resource already
# existed (the rerun path: update instead of create). Default 0: a fresh project.
DRY_RUN_ASSUME_EXISTS="${DRY_RUN_ASSUME_EXISTS:-0}"

# fd 3 is the original stdout, so that commands printed from inside $(capture ...)
# still reach the terminal instead of the variable.
exec 3>&1

die() { echo "deploy: error: $*" >&2; exit 1; }
note() { echo "deploy: $*" >&2; }
warn() { echo "deploy: warning: $*" >&2; }

is_dry_run() { [[ "$DRY_RUN" == 1 || "$DRY_RUN" == true ]]; }

# shell_quote prints its argument as one shell word: as is when it holds only
# characters no shell treats specially, otherwise in single quotes.
shell_quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# print_cmd writes one shell-quoted command line to the original stdout.
print_cmd() {
  local out="+" a
  for a in "$@"; do out+=" $(shell_quote "$a")"; done
  printf '%s\n' "$out" >&3
}

# run runs its arguments as a command, or prints them in a dry run.
run() {
  if is_dry_run; then print_cmd "$@"; return 0; fi
  note "running: $(print_cmd "$@" 3>&1)"
  "$@"
}

# exists runs a read-only describe command and reports whether the resource is
# there. "Not found" means false; any other failure (no permission, no network)
# stops the script rather than being mistaken for absence.
exists() {
  if is_dry_run; then
    print_cmd "$@"
    [[ "$DRY_RUN_ASSUME_EXISTS" == 1 ]]
    return
  fi
  local err
  if err="$("$@" 2>&1 >/dev/null)"; then return 0; fi
  if ! grep -qE 'PERMISSION_DENIED|UNAUTHENTICATED' <<<"$err" &&
    grep -qiE 'NOT_FOUND|not found|does not exist|404' <<<"$err"; then
    return 1
  fi
  die "could not check whether a resource exists: $(printf '%q ' "$@")
$err"
}

# capture prints the standard output of a read-only command (a describe with
# --format=value(...)). In a dry run it prints the command and echoes the
# placeholder instead.
capture() {
  local placeholder="$1"; shift
  if is_dry_run; then print_cmd "$@"; printf '%s\n' "$placeholder"; return 0; fi
  "$@"
}

# ---- checks on values that gcloud only rejects server-side ---------------------

# seconds_of prints the number of seconds of a gcloud duration written in whole
# seconds, minutes or hours (30s, 10m, 1h); anything else is a configuration error.
seconds_of() {
  local name="$1" v="$2"
  [[ "$v" =~ ^([0-9]+)(s|m|h)$ ]] || die "$name=$v: want a whole number of s, m or h (e.g. 1800s)"
  local n="${BASH_REMATCH[1]}"
  case "${BASH_REMATCH[2]}" in
    s) echo "$((10#$n))" ;;
    m) echo "$((10#$n * 60))" ;;
    h) echo "$((10#$n * 3600))" ;;
  esac
}

# go_duration_seconds prints the whole seconds of a Go duration (time.ParseDuration
# syntax, e.g. 90s, 1m30s, 1h); anything else is a configuration error.
go_duration_seconds() {
  local name="$1" v="$2" rest total=0 n unit
  rest="$v"
  [[ "$rest" =~ ^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$ ]] || die "$name=$v: not a Go duration (e.g. 60s, 1m30s, 1h)"
  while [[ "$rest" =~ ^([0-9]+)(\.[0-9]+)?(ns|us|µs|ms|s|m|h)(.*)$ ]]; do
    n="$((10#${BASH_REMATCH[1]}))" unit="${BASH_REMATCH[3]}" rest="${BASH_REMATCH[4]}"
    case "$unit" in
      h) total=$((total + n * 3600)) ;;
      m) total=$((total + n * 60)) ;;
      s) total=$((total + n)) ;;
    esac
  done
  echo "$total"
}

in_range() { # name value lo hi (all seconds)
  (( $2 >= $3 && $2 <= $4 )) || die "$1 must be between $3s and $4s, got $2s"
}

# ---- configuration -----------------------------------------------------------
# Every variable below may be set in the environment; the value after := is the
# default. deploy/README.md has the same list with explanations.

if ! is_dry_run && ! command -v gcloud >/dev/null; then
  die "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), or use --dry-run"
fi

# Seconds between retries of IAM changes (see run_retry).
: "${IAM_RETRY_DELAY:=10}"
[[ "$IAM_RETRY_DELAY" =~ ^[0-9]+$ ]] || die "IAM_RETRY_DELAY=$IAM_RETRY_DELAY: want whole seconds"

# Where.
: "${PROJECT:=${GOOGLE_CLOUD_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}}"
if [[ -z "$PROJECT" ]] && ! is_dry_run && command -v gcloud >/dev/null; then
  PROJECT="$(gcloud config get-value project 2>/dev/null || true)"
fi
[[ -n "$PROJECT" ]] || die "PROJECT is not set (nor GOOGLE_CLOUD_PROJECT, nor gcloud's core/project)"
[[ "$PROJECT" =~ ^[a-z][-a-z0-9]{4,28}[a-z0-9]$ ]] || die "PROJECT=$PROJECT is not a project id"
: "${REGION:=us-central1}"                       # functions, queue and scheduler job
: "${SOURCE_DIR:=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}" # module whose root package registers the functions

# Service accounts (account ids, without @PROJECT.iam.gserviceaccount.com).
: "${RUNTIME_SA:=taskguard-runtime}"             # identity of all three functions
: "${TASKS_SA:=taskguard-tasks}"                 # OIDC identity of Cloud Tasks -> Worker
: "${SCHEDULER_SA:=taskguard-scheduler}"         # OIDC identity of Cloud Scheduler -> CleanupLocks
: "${BUILD_SERVICE_ACCOUNT:=}"                   # optional: email of the SA Cloud Build uses to build the functions
: "${ENQUEUE_INVOKERS:=}"                        # optional: comma-separated IAM members allowed to call Enqueue

# Functions: their names are the entry points the root package of SOURCE_DIR
# registers (taskguard's own: app.DefaultFunctions; a module of its own: the
# names it gives app.Register and functions.HTTP).
: "${WORKER_FUNCTION:=Worker}"
: "${ENQUEUE_FUNCTION:=Enqueue}"                 # none: deploy no Enqueue function
: "${CLEANUP_FUNCTION:=CleanupLocks}"
: "${EXTRA_FUNCTIONS:=}"                         # your own functions: NAME[:TIMEOUT] ..., deployed like the others
: "${EXTRA_INVOKERS:=}"                          # comma-separated IAM members allowed to call each extra function
: "${DEPLOY_WITH:=functions}"                    # functions: gcloud functions deploy; run: gcloud run deploy --function
: "${RUNTIME:=go126}"
: "${MEMORY:=256Mi}"
: "${MAX_INSTANCES:=}"                           # optional cap on instances per function
: "${WORKER_TIMEOUT:=1800s}"                     # >= the tasks' dispatch deadline (at most 1800s)
: "${ENQUEUE_TIMEOUT:=60s}"
: "${CLEANUP_TIMEOUT:=600s}"                     # >= SCHEDULER_ATTEMPT_DEADLINE

# Datastore (Firestore in Datastore mode).
: "${DATASTORE_LOCATION:=$REGION}"               # only used when the database is created
: "${ENABLE_TTL:=1}"                             # 1: TTL policy on expiresAt as a garbage-collection backstop

# Cloud Tasks queue.
: "${QUEUE:=taskguard}"
: "${QUEUE_LOCATION:=$REGION}"
: "${QUEUE_MAX_ATTEMPTS:=100}"                   # includes the first attempt; -1 is unlimited
: "${QUEUE_MAX_RETRY_DURATION:=0s}"              # 0s: bounded by attempts only
: "${QUEUE_MIN_BACKOFF:=5s}"
: "${QUEUE_MAX_BACKOFF:=300s}"
: "${QUEUE_MAX_DOUBLINGS:=5}"
: "${QUEUE_MAX_DISPATCHES_PER_SECOND:=50}"
: "${QUEUE_MAX_CONCURRENT_DISPATCHES:=100}"

# Cloud Scheduler job for CleanupLocks.
: "${SCHEDULER_JOB:=taskguard-cleanup-locks}"
: "${SCHEDULER_LOCATION:=$REGION}"
: "${SCHEDULE:=17 3 * * *}"                      # daily, off the top of the hour
: "${SCHEDULE_TIME_ZONE:=Etc/UTC}"
: "${SCHEDULER_ATTEMPT_DEADLINE:=$CLEANUP_TIMEOUT}"
: "${SCHEDULER_MAX_RETRY_ATTEMPTS:=3}"

# Optional Direct VPC egress, for Memorystore (memcached or Valkey). Both or neither.
: "${VPC_NETWORK:=}"
: "${VPC_SUBNET:=}"

# What the functions read (passed through --set-env-vars under these exact names).
: "${TASKGUARD_DATASTORE_DATABASE:=}"            # empty: the (default) database
: "${TASKGUARD_DATASTORE_NAMESPACE:=}"
: "${TASKGUARD_DATASTORE_KIND:=TaskguardLock}"
: "${MEMCACHE_SERVERS:=}"                        # host:port[,host:port...]
: "${VALKEY_ADDR:=}"                             # host:port
: "${TASKGUARD_WORKER_URL:=}"                    # empty: read from the deployed Worker
: "${TASKGUARD_LEASE:=30s}"                      # lock lease (locking.DefaultLease); renewed every third of it
: "${TASKGUARD_CLEANUP_GRACE:=1h}"               # CleanupLocks deletes locks expired longer ago than this
: "${TASKGUARD_BUSY:=}"                          # park or 429; empty: park (see README, Configuration)

# ---- derived values and checks --------------------------------------------------

sa_email() { echo "$1@${PROJECT}.iam.gserviceaccount.com"; }
RUNTIME_SA_EMAIL="$(sa_email "$RUNTIME_SA")"
TASKS_SA_EMAIL="$(sa_email "$TASKS_SA")"
SCHEDULER_SA_EMAIL="$(sa_email "$SCHEDULER_SA")"
TASKGUARD_QUEUE="projects/${PROJECT}/locations/${QUEUE_LOCATION}/queues/${QUEUE}"
DATASTORE_DATABASE_ID="${TASKGUARD_DATASTORE_DATABASE:-(default)}"
WAIT_STATE_KIND=TaskguardWaitState               # tasks/dswait.KindState: park mode's wait records

# The functions to deploy, "NAME TIMEOUT" each: taskguard's, then EXTRA_FUNCTIONS
# (60s unless given).
valid_function_name() { [[ "$1" =~ ^[A-Za-z]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?$ ]]; }
case "$DEPLOY_WITH" in functions|run) ;; *) die "DEPLOY_WITH=$DEPLOY_WITH: want functions or run" ;; esac
FUNCTIONS=("$WORKER_FUNCTION $WORKER_TIMEOUT")
[[ "$ENQUEUE_FUNCTION" == none ]] || FUNCTIONS+=("$ENQUEUE_FUNCTION $ENQUEUE_TIMEOUT")
FUNCTIONS+=("$CLEANUP_FUNCTION $CLEANUP_TIMEOUT")
EXTRA=()
for _f in $EXTRA_FUNCTIONS; do
  _name="${_f%%:*}" _timeout=60s
  [[ "$_f" == *:* ]] && _timeout="${_f#*:}"
  valid_function_name "$_name" || die "EXTRA_FUNCTIONS: '$_name' is not a function name (letters, digits, hyphens; starts with a letter)"
  _s="$(seconds_of "EXTRA_FUNCTIONS timeout of $_name" "$_timeout")"
  in_range "EXTRA_FUNCTIONS timeout of $_name" "$_s" 1 3600
  FUNCTIONS+=("$_name $_timeout")
  EXTRA+=("$_name")
done
unset _f _name _timeout _s
for _v in WORKER_FUNCTION ENQUEUE_FUNCTION CLEANUP_FUNCTION; do
  [[ "$_v" == ENQUEUE_FUNCTION && "${!_v}" == none ]] && continue
  valid_function_name "${!_v}" || die "$_v=${!_v}: not a function name (letters, digits, hyphens; starts with a letter)"
done
unset _v
_services="$(for _f in "${FUNCTIONS[@]}"; do tr '[:upper:]' '[:lower:]' <<<"${_f%% *}"; done | sort | uniq -d)"
[[ -z "$_services" ]] || die "two functions would share the Cloud Run service '$_services' (names differ only in case, or are repeated)"
unset _services _f
[[ "$ENQUEUE_FUNCTION" != none || -z "$ENQUEUE_INVOKERS" ]] || die "ENQUEUE_INVOKERS is set but ENQUEUE_FUNCTION=none deploys no Enqueue function"
[[ ${#EXTRA[@]} -gt 0 || -z "$EXTRA_INVOKERS" ]] || die "EXTRA_INVOKERS is set but EXTRA_FUNCTIONS is empty"

for _sa in "$RUNTIME_SA" "$TASKS_SA" "$SCHEDULER_SA"; do
  [[ "$_sa" =~ ^[a-z][-a-z0-9]{4,28}[a-z0-9]$ ]] || die "service account id '$_sa' must be 6-30 lowercase letters, digits or hyphens"
done
unset _sa
if [[ -n "$VPC_NETWORK" && -z "$VPC_SUBNET" ]] || [[ -z "$VPC_NETWORK" && -n "$VPC_SUBNET" ]]; then
  die "set both VPC_NETWORK and VPC_SUBNET, or neither"
fi
if [[ -n "$MEMCACHE_SERVERS$VALKEY_ADDR" && -z "$VPC_NETWORK" ]]; then
  warn "MEMCACHE_SERVERS/VALKEY_ADDR are set but VPC_NETWORK is not: Memorystore is reachable only through VPC egress"
fi
[[ "$ENABLE_TTL" == 0 || "$ENABLE_TTL" == 1 ]] || die "ENABLE_TTL=$ENABLE_TTL: want 0 or 1"
[[ -z "$MAX_INSTANCES" || "$MAX_INSTANCES" =~ ^[1-9][0-9]*$ ]] || die "MAX_INSTANCES=$MAX_INSTANCES: want a positive integer"
[[ -z "$TASKGUARD_WORKER_URL" || "$TASKGUARD_WORKER_URL" =~ ^https:// ]] || die "TASKGUARD_WORKER_URL must be an https URL"
[[ -z "$TASKGUARD_BUSY" || "$TASKGUARD_BUSY" == park || "$TASKGUARD_BUSY" == 429 ]] || die "TASKGUARD_BUSY=$TASKGUARD_BUSY: want park or 429 (empty: park)"

# Timeouts. gcloud accepts any duration offline; the API enforces these ranges.
_worker_s="$(seconds_of WORKER_TIMEOUT "$WORKER_TIMEOUT")"
_enqueue_s="$(seconds_of ENQUEUE_TIMEOUT "$ENQUEUE_TIMEOUT")"
_cleanup_s="$(seconds_of CLEANUP_TIMEOUT "$CLEANUP_TIMEOUT")"
_attempt_s="$(seconds_of SCHEDULER_ATTEMPT_DEADLINE "$SCHEDULER_ATTEMPT_DEADLINE")"
in_range WORKER_TIMEOUT "$_worker_s" 1 3600          # HTTP functions: up to 60 min
in_range ENQUEUE_TIMEOUT "$_enqueue_s" 1 3600
in_range CLEANUP_TIMEOUT "$_cleanup_s" 1 3600
in_range SCHEDULER_ATTEMPT_DEADLINE "$_attempt_s" 15 1800   # Cloud Scheduler HTTP targets
(( _attempt_s <= _cleanup_s )) || die "SCHEDULER_ATTEMPT_DEADLINE ($SCHEDULER_ATTEMPT_DEADLINE) must not exceed CLEANUP_TIMEOUT ($CLEANUP_TIMEOUT)"
# A Cloud Tasks dispatch deadline is at most 30 min. With the Worker timeout at
# or above it, Cloud Tasks stops waiting before the platform cuts the request,
# so a retry meets a lock that is still held (and renewed), never a half-killed run.
(( _worker_s >= 1800 )) || warn "WORKER_TIMEOUT=$WORKER_TIMEOUT is below 1800s: keep every task's dispatch deadline at or below it"
_lease_s="$(go_duration_seconds TASKGUARD_LEASE "$TASKGUARD_LEASE")"
go_duration_seconds TASKGUARD_CLEANUP_GRACE "$TASKGUARD_CLEANUP_GRACE" >/dev/null
(( _lease_s >= 1 )) || die "TASKGUARD_LEASE=$TASKGUARD_LEASE: want at least 1s"
(( _lease_s < _worker_s )) || warn "TASKGUARD_LEASE ($TASKGUARD_LEASE) >= WORKER_TIMEOUT: a crashed holder would block its id longer than a whole attempt"
_maxb_s="$(seconds_of QUEUE_MAX_BACKOFF "$QUEUE_MAX_BACKOFF")"
seconds_of QUEUE_MIN_BACKOFF "$QUEUE_MIN_BACKOFF" >/dev/null
seconds_of QUEUE_MAX_RETRY_DURATION "$QUEUE_MAX_RETRY_DURATION" >/dev/null
(( _maxb_s >= _lease_s )) || warn "QUEUE_MAX_BACKOFF ($QUEUE_MAX_BACKOFF) < TASKGUARD_LEASE: retries of a busy id may run out before a dead holder's lease does"
for _v in TASKGUARD_DATASTORE_DATABASE TASKGUARD_DATASTORE_NAMESPACE TASKGUARD_DATASTORE_KIND MEMCACHE_SERVERS \
  VALKEY_ADDR TASKGUARD_WORKER_URL TASKGUARD_LEASE TASKGUARD_CLEANUP_GRACE; do
  [[ "${!_v}" != *";"* ]] || die "$_v must not contain ';' (it separates the functions' environment variables)"
done
unset _v
[[ "$QUEUE_MAX_ATTEMPTS" =~ ^(-1|[1-9][0-9]*)$ ]] || die "QUEUE_MAX_ATTEMPTS=$QUEUE_MAX_ATTEMPTS: want -1 or a positive integer"
unset _worker_s _enqueue_s _cleanup_s _attempt_s _lease_s _maxb_s

# functions_env prints the --set-env-vars value for the functions: the names the
# code reads, empty ones left out. When a value contains a comma (MEMCACHE_SERVERS
# with several servers) it switches to gcloud's alternate delimiter, "^;^K=V;K=V"
# (see `gcloud topic escaping`).
functions_env() {
  local worker_url="$1" out="" sep="" delim="," kv
  local pairs=(
    "GOOGLE_CLOUD_PROJECT=$PROJECT"
    "TASKGUARD_DATASTORE_DATABASE=$TASKGUARD_DATASTORE_DATABASE"
    "TASKGUARD_DATASTORE_NAMESPACE=$TASKGUARD_DATASTORE_NAMESPACE"
    "TASKGUARD_DATASTORE_KIND=$TASKGUARD_DATASTORE_KIND"
    "MEMCACHE_SERVERS=$MEMCACHE_SERVERS"
    "VALKEY_ADDR=$VALKEY_ADDR"
    "TASKGUARD_QUEUE=$TASKGUARD_QUEUE"
    "TASKGUARD_WORKER_URL=$worker_url"
    "TASKGUARD_TASK_SERVICE_ACCOUNT=$TASKS_SA_EMAIL"
    "TASKGUARD_LEASE=$TASKGUARD_LEASE"
    "TASKGUARD_CLEANUP_GRACE=$TASKGUARD_CLEANUP_GRACE"
    "TASKGUARD_BUSY=$TASKGUARD_BUSY"
  )
  for kv in "${pairs[@]}"; do
    [[ "$kv" != *";"* ]] || die "environment value must not contain ';': $kv"
    [[ "$kv" != *","* ]] || delim=";"
  done
  for kv in "${pairs[@]}"; do
    [[ "$kv" == *= ]] && continue
    out+="$sep$kv"; sep="$delim"
  done
  if [[ "$delim" == ";" ]]; then out="^;^$out"; fi
  printf '%s\n' "$out"
}

# run_retry is run for IAM changes on service accounts created moments earlier:
# IAM is eventually consistent, so a new account can be "not found" for a few
# seconds. It retries a failing command up to 6 times, IAM_RETRY_DELAY seconds apart.
run_retry() {
  if is_dry_run; then print_cmd "$@"; return 0; fi
  local i
  for i in 1 2 3 4 5 6; do
    note "running: $(print_cmd "$@" 3>&1)"
    if "$@"; then return 0; fi
    (( i < 6 )) || return 1
    note "retrying in ${IAM_RETRY_DELAY}s (IAM changes take a moment to propagate)"
    sleep "$IAM_RETRY_DELAY"
  done
}

# service_name prints the Cloud Run service behind a gen2 function: its name in lowercase.
service_name() { tr '[:upper:]' '[:lower:]' <<<"$1"; }

# function_url prints the HTTPS URL of a deployed function (or a placeholder in a dry run).
function_url() {
  if [[ "$DEPLOY_WITH" == run ]]; then
    capture "https://$(service_name "$1")-PROJECT_NUMBER.${REGION}.run.app" \
      gcloud run services describe "$(service_name "$1")" --region="$REGION" --project="$PROJECT" \
      --format='value(status.url)'
    return
  fi
  capture "https://$(service_name "$1")-PROJECT_NUMBER.${REGION}.run.app" \
    gcloud functions describe "$1" --gen2 --region="$REGION" --project="$PROJECT" \
    --format='value(serviceConfig.uri)'
}

# grant_invoker lets member call the function name (roles/run.invoker on it only).
grant_invoker() { # name member
  if [[ "$DEPLOY_WITH" == run ]]; then
    run_retry gcloud run services add-iam-policy-binding "$(service_name "$1")" --region="$REGION" \
      --member="$2" --role=roles/run.invoker --project="$PROJECT" --format=none
  else
    run_retry gcloud functions add-invoker-policy-binding "$1" --region="$REGION" \
      --member="$2" --project="$PROJECT" --format=none
  fi
}

# iam_members prints the members of a comma-separated list, one a line, checked.
iam_members() { # variable-name
  local members member
  IFS=',' read -r -a members <<<"${!1}"
  for member in "${members[@]}"; do
    member="${member//[[:space:]]/}"
    [[ -n "$member" ]] || continue
    [[ "$member" =~ ^(user|serviceAccount|group|domain|principal|principalSet):.+ ]] || die "$1: '$member' is not an IAM member (e.g. serviceAccount:EMAIL)"
    printf '%s\n' "$member"
  done
}

# project_number prints the project's number (or a placeholder in a dry run).
project_number() {
  capture 123456789012 gcloud projects describe "$PROJECT" --format='value(projectNumber)'
}
