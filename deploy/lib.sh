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

# Service accounts (account ids, without @PROJECT.iam.gserviceaccount.com):
# one per function, each granted only what its function does.
[[ -z "${RUNTIME_SA:-}" ]] || die "RUNTIME_SA (one account for every function) is replaced by one account per function: WORKER_SA, ENQUEUE_SA, CLEANUP_SA and EXTRA_SA (see deploy/README.md)"
: "${WORKER_SA:=taskguard-worker}"               # Worker: Datastore, enqueuer on the queue, actAs TASKS_SA
: "${ENQUEUE_SA:=taskguard-enqueue}"             # Enqueue: enqueuer on the queue, actAs TASKS_SA
: "${CLEANUP_SA:=taskguard-cleanup}"             # CleanupLocks: Datastore only
: "${EXTRA_SA:=taskguard-extra}"                 # EXTRA_FUNCTIONS: as the Worker (they lock and enqueue)
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
: "${PUBLIC_FUNCTIONS:=}"                        # names among EXTRA_FUNCTIONS anyone may call (allUsers), e.g. a webhook
: "${DEPLOY_WITH:=functions}"                    # functions: gcloud functions deploy; run: gcloud run deploy --function
: "${RUNTIME:=go126}"

# The instance profile, the same for both deploy commands (DEPLOY_WITH): without
# it `gcloud functions deploy` gives 256 MiB = 0.167 vCPU and concurrency 1,
# `gcloud run deploy` 1 vCPU and concurrency 80.
: "${CPU:=1}"                                    # vCPUs per instance: 1, 2, 4, 6 or 8 (concurrency > 1 needs >= 1)
: "${MEMORY:=512Mi}"
: "${CONCURRENCY:=80}"                           # requests one instance serves at once (1-1000)
: "${BILLING:=request}"                          # request: CPU only while a request is in flight; instance: CPU for the instance's whole life
: "${WORKER_MIN_INSTANCES:=0}"                   # Worker instances kept warm (billed while idle); 0: none
: "${MAX_INSTANCES:=}"                           # optional cap on instances per function
: "${TARGET_INGRESS:=internal}"                  # Worker and CleanupLocks: internal (Cloud Tasks and Cloud Scheduler of PROJECT reach it) or all
: "${ENDPOINT_INGRESS:=all}"                     # Enqueue and EXTRA_FUNCTIONS, called from outside: all, internal or internal-and-cloud-load-balancing

# The one deadline of a task: Cloud Tasks' dispatch deadline of every task
# (15s-1800s). The Worker's timeout follows it, and the functions read it as
# TASKGUARD_TASK_DEADLINE (the tasks client's dispatch deadline).
: "${TASK_DEADLINE:=1800s}"
: "${WORKER_TIMEOUT:=$TASK_DEADLINE}"            # >= TASK_DEADLINE, <= 3600s
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
: "${VALKEY_ADDR:=}"                             # host:port, or a redis:// or rediss:// URL without a password
: "${VALKEY_CLUSTER:=}"                          # true: cluster mode (Memorystore for Valkey's default)
: "${VALKEY_TLS:=}"                              # true: TLS (Memorystore in-transit encryption)
: "${VALKEY_IAM_AUTH:=}"                         # true: IAM authentication (roles/memorystore.dbConnectionUser is granted)
: "${VALKEY_USERNAME:=}"                         # ACL user name
: "${VALKEY_PASSWORD_SECRET:=}"                  # Secret Manager secret holding the AUTH password: SECRET[:VERSION]
: "${VALKEY_TLS_CA_SECRET:=}"                    # Secret Manager secret holding the server CA's PEM: SECRET[:VERSION]
: "${TASKGUARD_WORKER_URL:=}"                    # empty: read from the deployed Worker
: "${TASKGUARD_LEASE:=30s}"                      # lock lease (locking.DefaultLease); renewed every third of it
: "${TASKGUARD_CLEANUP_GRACE:=1h}"               # CleanupLocks deletes locks expired longer ago than this
: "${TASKGUARD_BUSY:=}"                          # park or 429; empty: park (see README, Configuration)

# ---- derived values and checks --------------------------------------------------
# Everything below is checked before any script runs a command, so that a
# configuration the real run would stop on stops the dry run too, and all.sh
# stops before its first step.

sa_email() { echo "$1@${PROJECT}.iam.gserviceaccount.com"; }
WORKER_SA_EMAIL="$(sa_email "$WORKER_SA")"
ENQUEUE_SA_EMAIL="$(sa_email "$ENQUEUE_SA")"
CLEANUP_SA_EMAIL="$(sa_email "$CLEANUP_SA")"
EXTRA_SA_EMAIL="$(sa_email "$EXTRA_SA")"
TASKS_SA_EMAIL="$(sa_email "$TASKS_SA")"
SCHEDULER_SA_EMAIL="$(sa_email "$SCHEDULER_SA")"
TASKGUARD_QUEUE="projects/${PROJECT}/locations/${QUEUE_LOCATION}/queues/${QUEUE}"
DATASTORE_DATABASE_ID="${TASKGUARD_DATASTORE_DATABASE:-(default)}"
WAIT_KINDS=(TaskguardWaitRecord TaskguardWaitRun TaskguardWaitBody TaskguardWaitWake)  # tasks/dswait.Kinds: park mode's wait list
VALKEY_CA_FILE=/secrets/valkey-ca/ca.pem         # where the CA secret is mounted (VALKEY_TLS_CA_FILE)

# The functions to deploy, "NAME TIMEOUT ROLE" each (ROLE: worker, enqueue,
# cleanup or extra): taskguard's, then EXTRA_FUNCTIONS (60s unless given).
valid_function_name() { [[ "$1" =~ ^[A-Za-z]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?$ ]]; }
case "$DEPLOY_WITH" in functions|run) ;; *) die "DEPLOY_WITH=$DEPLOY_WITH: want functions or run" ;; esac
FUNCTIONS=("$WORKER_FUNCTION $WORKER_TIMEOUT worker")
[[ "$ENQUEUE_FUNCTION" == none ]] || FUNCTIONS+=("$ENQUEUE_FUNCTION $ENQUEUE_TIMEOUT enqueue")
FUNCTIONS+=("$CLEANUP_FUNCTION $CLEANUP_TIMEOUT cleanup")
EXTRA=()
for _f in $EXTRA_FUNCTIONS; do
  _name="${_f%%:*}" _timeout=60s
  [[ "$_f" == *:* ]] && _timeout="${_f#*:}"
  valid_function_name "$_name" || die "EXTRA_FUNCTIONS: '$_name' is not a function name (letters, digits, hyphens; starts with a letter)"
  _s="$(seconds_of "EXTRA_FUNCTIONS timeout of $_name" "$_timeout")"
  in_range "EXTRA_FUNCTIONS timeout of $_name" "$_s" 1 3600
  FUNCTIONS+=("$_name $_timeout extra")
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

# is_public reports whether the function name is one of PUBLIC_FUNCTIONS.
is_public() { [[ " $PUBLIC_FUNCTIONS " == *" $1 "* ]]; }
for _p in $PUBLIC_FUNCTIONS; do
  [[ " ${EXTRA[*]} " == *" $_p "* ]] || die "PUBLIC_FUNCTIONS: '$_p' is not one of EXTRA_FUNCTIONS (${EXTRA[*]:-none}); only your own functions can be public, never $WORKER_FUNCTION, $CLEANUP_FUNCTION or $ENQUEUE_FUNCTION"
done
unset _p

# iam_members prints the members of a comma-separated list, one a line, checked.
iam_members() { # variable-name
  local members member
  IFS=',' read -r -a members <<<"${!1}"
  for member in "${members[@]}"; do
    member="${member//[[:space:]]/}"
    [[ -n "$member" ]] || continue
    if [[ "$member" == allUsers || "$member" == allAuthenticatedUsers ]]; then
      die "$1: '$member' is not an IAM member this variable takes: to let anyone call one of your functions (a webhook), list it in PUBLIC_FUNCTIONS"
    fi
    [[ "$member" =~ ^(user|serviceAccount|group|domain|principal|principalSet):.+ ]] || die "$1: '$member' is not an IAM member (e.g. serviceAccount:EMAIL)"
    printf '%s\n' "$member"
  done
}
# Checked here, before any step runs; 06-invokers.sh reads them.
ENQUEUE_MEMBERS="$(iam_members ENQUEUE_INVOKERS)"
EXTRA_MEMBERS="$(iam_members EXTRA_INVOKERS)"

for _sa in "$WORKER_SA" "$ENQUEUE_SA" "$CLEANUP_SA" "$EXTRA_SA" "$TASKS_SA" "$SCHEDULER_SA"; do
  [[ "$_sa" =~ ^[a-z][-a-z0-9]{4,28}[a-z0-9]$ ]] || die "service account id '$_sa' must be 6-30 lowercase letters, digits or hyphens"
done
_dups="$(printf '%s\n' "$WORKER_SA" "$ENQUEUE_SA" "$CLEANUP_SA" "$EXTRA_SA" "$TASKS_SA" "$SCHEDULER_SA" | sort | uniq -d)"
[[ -z "$_dups" ]] || die "service account '$_dups' is named for two roles: each function, Cloud Tasks and Cloud Scheduler get an account of their own"
unset _sa _dups
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

# The instance profile.
[[ "$CPU" =~ ^(1|2|4|6|8)$ ]] || die "CPU=$CPU: want 1, 2, 4, 6 or 8 vCPUs (below 1 vCPU Cloud Run forces concurrency 1 and request-based billing)"
[[ "$MEMORY" =~ ^([1-9][0-9]*)(Mi|Gi)$ ]] || die "MEMORY=$MEMORY: want MiB or GiB, e.g. 512Mi or 2Gi"
_mem_mi="${BASH_REMATCH[1]}"
[[ "${BASH_REMATCH[2]}" == Gi ]] && _mem_mi=$((_mem_mi * 1024))
(( _mem_mi >= 512 )) || die "MEMORY=$MEMORY: want at least 512Mi with $CPU vCPU"
case "$CPU" in
  4) (( _mem_mi >= 2048 )) || die "MEMORY=$MEMORY: 4 vCPUs need at least 2Gi" ;;
  6|8) (( _mem_mi >= 4096 )) || die "MEMORY=$MEMORY: $CPU vCPUs need at least 4Gi" ;;
esac
(( _mem_mi <= 32768 )) || die "MEMORY=$MEMORY: at most 32Gi"
unset _mem_mi
[[ "$CONCURRENCY" =~ ^[1-9][0-9]*$ ]] && (( CONCURRENCY <= 1000 )) || die "CONCURRENCY=$CONCURRENCY: want 1 to 1000"
(( CONCURRENCY > 1 )) || warn "CONCURRENCY=1: every delivery gets an instance of its own, so the Worker's in-process lock hints and hand-offs never meet"
[[ "$BILLING" == request || "$BILLING" == instance ]] || die "BILLING=$BILLING: want request (CPU only while a request is in flight) or instance (CPU for the instance's whole life)"
[[ "$WORKER_MIN_INSTANCES" =~ ^(0|[1-9][0-9]*)$ ]] || die "WORKER_MIN_INSTANCES=$WORKER_MIN_INSTANCES: want 0 or a positive integer"
if [[ -n "$MAX_INSTANCES" ]] && (( WORKER_MIN_INSTANCES > MAX_INSTANCES )); then
  die "WORKER_MIN_INSTANCES ($WORKER_MIN_INSTANCES) exceeds MAX_INSTANCES ($MAX_INSTANCES)"
fi
for _v in TARGET_INGRESS ENDPOINT_INGRESS; do
  case "${!_v}" in internal|all|internal-and-cloud-load-balancing) ;;
    *) die "$_v=${!_v}: want internal, all or internal-and-cloud-load-balancing" ;;
  esac
done
unset _v
[[ -z "$PUBLIC_FUNCTIONS" || "$ENDPOINT_INGRESS" == all ]] || die "PUBLIC_FUNCTIONS needs ENDPOINT_INGRESS=all: with $ENDPOINT_INGRESS the internet cannot reach them"

# Valkey: the settings redislock.FromEnv reads; secrets come from Secret Manager.
[[ -z "${VALKEY_PASSWORD:-}${REDIS_PASSWORD:-}" ]] || die "VALKEY_PASSWORD is not passed as a plain variable: put the password in Secret Manager and set VALKEY_PASSWORD_SECRET=SECRET[:VERSION]"
[[ ! "$VALKEY_ADDR" =~ ^rediss?://[^/@]*:[^/@]*@ ]] || die "VALKEY_ADDR must not carry a password: put it in Secret Manager and set VALKEY_PASSWORD_SECRET"
for _v in VALKEY_CLUSTER VALKEY_TLS VALKEY_IAM_AUTH; do
  [[ -z "${!_v}" || "${!_v}" == true || "${!_v}" == false ]] || die "$_v=${!_v}: want true or false"
done
for _v in VALKEY_PASSWORD_SECRET VALKEY_TLS_CA_SECRET; do
  [[ -z "${!_v}" || "${!_v}" =~ ^[A-Za-z0-9_-]{1,255}(:([1-9][0-9]*|latest))?$ ]] || die "$_v=${!_v}: want SECRET or SECRET:VERSION (a secret id of PROJECT; VERSION a number or latest)"
done
unset _v
if [[ -z "$VALKEY_ADDR" ]]; then
  for _v in VALKEY_CLUSTER VALKEY_TLS VALKEY_IAM_AUTH VALKEY_USERNAME VALKEY_PASSWORD_SECRET VALKEY_TLS_CA_SECRET; do
    [[ -z "${!_v}" ]] || die "$_v is set but VALKEY_ADDR is not"
  done
  unset _v
fi
[[ "$VALKEY_IAM_AUTH" != true || -z "$VALKEY_PASSWORD_SECRET" ]] || die "VALKEY_IAM_AUTH=true and VALKEY_PASSWORD_SECRET are both set: IAM authentication takes no password"
[[ -z "$VALKEY_TLS_CA_SECRET" || "$VALKEY_TLS" == true || "$VALKEY_ADDR" == rediss://* ]] || die "VALKEY_TLS_CA_SECRET is set but TLS is not on (VALKEY_TLS=true or a rediss:// address)"
# secret_ref prints a --set-secrets reference, SECRET:VERSION.
secret_ref() { if [[ "$1" == *:* ]]; then echo "$1"; else echo "$1:latest"; fi; }
# The --set-secrets value of the functions that take Weak locks (Worker and
# EXTRA_FUNCTIONS); empty when there are no secrets.
FUNCTION_SECRETS=""
[[ -z "$VALKEY_PASSWORD_SECRET" ]] || FUNCTION_SECRETS="VALKEY_PASSWORD=$(secret_ref "$VALKEY_PASSWORD_SECRET")"
if [[ -n "$VALKEY_TLS_CA_SECRET" ]]; then
  FUNCTION_SECRETS+="${FUNCTION_SECRETS:+,}$VALKEY_CA_FILE=$(secret_ref "$VALKEY_TLS_CA_SECRET")"
fi
# The secret ids (without versions) the Weak-lock functions' accounts may read.
SECRETS=()
for _v in "$VALKEY_PASSWORD_SECRET" "$VALKEY_TLS_CA_SECRET"; do
  [[ -z "$_v" ]] || SECRETS+=("${_v%%:*}")
done
unset _v

# The module that is uploaded: Cloud Build sees only SOURCE_DIR.
[[ -f "$SOURCE_DIR/go.mod" ]] || die "SOURCE_DIR=$SOURCE_DIR has no go.mod: point it at the module whose root package registers the functions"
# local_replacements prints the local paths of go.mod's replace directives
# (the right-hand sides that are directories: ./x, ../x, /x).
local_replacements() {
  awk '
    /^[[:space:]]*\/\// { next }
    /^replace[[:space:]]*\($/ { block = 1; next }
    block && /^\)/ { block = 0; next }
    (block || /^replace[[:space:]]/) && /=>/ {
      sub(/.*=>[[:space:]]*/, ""); sub(/[[:space:]]*\/\/.*/, "")
      split($0, f, /[[:space:]]+/)
      if (f[1] ~ /^(\.\/|\.\.\/|\/|\.$|\.\.$)/) print f[1]
    }' "$SOURCE_DIR/go.mod"
}
while IFS= read -r _r; do
  [[ -n "$_r" ]] || continue
  [[ -f "$SOURCE_DIR/vendor/modules.txt" ]] || die "SOURCE_DIR's go.mod replaces a module with the local directory $_r, which is not uploaded: run 'go mod vendor' in $SOURCE_DIR first, or require a published version"
  grep -qF "=> $_r" "$SOURCE_DIR/vendor/modules.txt" || die "SOURCE_DIR's vendor/modules.txt does not record the replacement by $_r: run 'go mod vendor' in $SOURCE_DIR again"
done < <(local_replacements)
unset _r
# The root package must register every function deployed under its name (the
# Functions Framework looks the entry point up by name at start; an unknown
# one fails the deployment after the build). The check reads the root
# package's source: each name must appear in it as a Go string literal, or be
# one of app.DefaultFunctions' when it registers those.
_root_src="$(find "$SOURCE_DIR" -maxdepth 1 -name '*.go' ! -name '*_test.go' -exec cat {} + 2>/dev/null || true)"
[[ -n "$_root_src" ]] || die "SOURCE_DIR=$SOURCE_DIR has no Go files in its root package, which registers the functions"
for _f in "${FUNCTIONS[@]}"; do
  _name="${_f%% *}"
  if grep -qF "\"$_name\"" <<<"$_root_src"; then continue; fi
  if [[ "$_name" =~ ^(Worker|Enqueue|CleanupLocks)$ ]] && grep -qF "app.DefaultFunctions" <<<"$_root_src"; then continue; fi
  die "the root package of SOURCE_DIR=$SOURCE_DIR does not register a function named $_name (no \"$_name\" in its Go files): check WORKER_FUNCTION, ENQUEUE_FUNCTION, CLEANUP_FUNCTION and EXTRA_FUNCTIONS"
done
unset _root_src _f _name

# Timeouts. gcloud accepts any duration offline; the API enforces these ranges.
_deadline_s="$(seconds_of TASK_DEADLINE "$TASK_DEADLINE")"
_worker_s="$(seconds_of WORKER_TIMEOUT "$WORKER_TIMEOUT")"
_enqueue_s="$(seconds_of ENQUEUE_TIMEOUT "$ENQUEUE_TIMEOUT")"
_cleanup_s="$(seconds_of CLEANUP_TIMEOUT "$CLEANUP_TIMEOUT")"
_attempt_s="$(seconds_of SCHEDULER_ATTEMPT_DEADLINE "$SCHEDULER_ATTEMPT_DEADLINE")"
in_range TASK_DEADLINE "$_deadline_s" 15 1800        # Cloud Tasks: an HTTP task's dispatch deadline
in_range WORKER_TIMEOUT "$_worker_s" 1 3600          # HTTP functions: up to 60 min
in_range ENQUEUE_TIMEOUT "$_enqueue_s" 1 3600
in_range CLEANUP_TIMEOUT "$_cleanup_s" 1 3600
in_range SCHEDULER_ATTEMPT_DEADLINE "$_attempt_s" 15 1800   # Cloud Scheduler HTTP targets
(( _attempt_s <= _cleanup_s )) || die "SCHEDULER_ATTEMPT_DEADLINE ($SCHEDULER_ATTEMPT_DEADLINE) must not exceed CLEANUP_TIMEOUT ($CLEANUP_TIMEOUT)"
# The Worker's jobs end before the dispatch deadline; a platform timeout below
# it would answer 504 while Cloud Tasks still waits, and cut the job short.
(( _worker_s >= _deadline_s )) || die "WORKER_TIMEOUT ($WORKER_TIMEOUT) is below TASK_DEADLINE ($TASK_DEADLINE), the tasks' dispatch deadline: set TASK_DEADLINE=$WORKER_TIMEOUT instead (the Worker's timeout follows it)"
TASK_DEADLINE_GO="${_deadline_s}s"               # TASKGUARD_TASK_DEADLINE, as a Go duration
_lease_s="$(go_duration_seconds TASKGUARD_LEASE "$TASKGUARD_LEASE")"
go_duration_seconds TASKGUARD_CLEANUP_GRACE "$TASKGUARD_CLEANUP_GRACE" >/dev/null
(( _lease_s >= 1 )) || die "TASKGUARD_LEASE=$TASKGUARD_LEASE: want at least 1s"
(( _lease_s < _deadline_s )) || warn "TASKGUARD_LEASE ($TASKGUARD_LEASE) >= TASK_DEADLINE: a crashed holder would block its id longer than a whole attempt"
_maxb_s="$(seconds_of QUEUE_MAX_BACKOFF "$QUEUE_MAX_BACKOFF")"
seconds_of QUEUE_MIN_BACKOFF "$QUEUE_MIN_BACKOFF" >/dev/null
seconds_of QUEUE_MAX_RETRY_DURATION "$QUEUE_MAX_RETRY_DURATION" >/dev/null
(( _maxb_s >= _lease_s )) || warn "QUEUE_MAX_BACKOFF ($QUEUE_MAX_BACKOFF) < TASKGUARD_LEASE: retries of a busy id may run out before a dead holder's lease does"
for _v in TASKGUARD_DATASTORE_DATABASE TASKGUARD_DATASTORE_NAMESPACE TASKGUARD_DATASTORE_KIND MEMCACHE_SERVERS \
  VALKEY_ADDR VALKEY_USERNAME TASKGUARD_WORKER_URL TASKGUARD_LEASE TASKGUARD_CLEANUP_GRACE; do
  [[ "${!_v}" != *";"* ]] || die "$_v must not contain ';' (it separates the functions' environment variables)"
done
unset _v
[[ "$QUEUE_MAX_ATTEMPTS" =~ ^(-1|[1-9][0-9]*)$ ]] || die "QUEUE_MAX_ATTEMPTS=$QUEUE_MAX_ATTEMPTS: want -1 or a positive integer"
unset _deadline_s _worker_s _enqueue_s _cleanup_s _attempt_s _lease_s _maxb_s

# weak_locks reports whether a function of this role takes Weak locks, and so
# gets the memcached or Valkey settings and secrets: the Worker (its jobs) and
# EXTRA_FUNCTIONS (your code); not Enqueue, nor CleanupLocks (Datastore only).
weak_locks() { [[ "$1" == worker || "$1" == extra ]]; }

# functions_env prints the --set-env-vars value for a function of the role
# given: the names the code reads, empty ones left out. When a value contains
# a comma (MEMCACHE_SERVERS with several servers) it switches to gcloud's
# alternate delimiter, "^;^K=V;K=V" (see `gcloud topic escaping`).
functions_env() { # worker-url role
  local worker_url="$1" role="$2" out="" sep="" delim="," kv
  local pairs=(
    "GOOGLE_CLOUD_PROJECT=$PROJECT"
    "TASKGUARD_DATASTORE_DATABASE=$TASKGUARD_DATASTORE_DATABASE"
    "TASKGUARD_DATASTORE_NAMESPACE=$TASKGUARD_DATASTORE_NAMESPACE"
    "TASKGUARD_DATASTORE_KIND=$TASKGUARD_DATASTORE_KIND"
    "TASKGUARD_QUEUE=$TASKGUARD_QUEUE"
    "TASKGUARD_WORKER_URL=$worker_url"
    "TASKGUARD_TASK_SERVICE_ACCOUNT=$TASKS_SA_EMAIL"
    "TASKGUARD_TASK_DEADLINE=$TASK_DEADLINE_GO"
    "TASKGUARD_LEASE=$TASKGUARD_LEASE"
    "TASKGUARD_CLEANUP_GRACE=$TASKGUARD_CLEANUP_GRACE"
    "TASKGUARD_BUSY=$TASKGUARD_BUSY"
  )
  if weak_locks "$role"; then
    pairs+=(
      "MEMCACHE_SERVERS=$MEMCACHE_SERVERS"
      "VALKEY_ADDR=$VALKEY_ADDR"
      "VALKEY_CLUSTER=$VALKEY_CLUSTER"
      "VALKEY_TLS=$VALKEY_TLS"
      "VALKEY_IAM_AUTH=$VALKEY_IAM_AUTH"
      "VALKEY_USERNAME=$VALKEY_USERNAME"
      "VALKEY_TLS_CA_FILE=${VALKEY_TLS_CA_SECRET:+$VALKEY_CA_FILE}"
    )
  fi
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

# sa_of prints the email of the service account a function of the role runs as.
sa_of() { # role
  case "$1" in
    worker) echo "$WORKER_SA_EMAIL" ;;
    enqueue) echo "$ENQUEUE_SA_EMAIL" ;;
    cleanup) echo "$CLEANUP_SA_EMAIL" ;;
    extra) echo "$EXTRA_SA_EMAIL" ;;
  esac
}

# ingress_of prints the ingress setting of a function of the role: the
# targets of Cloud Tasks and Cloud Scheduler take TARGET_INGRESS, the
# endpoints called from outside ENDPOINT_INGRESS.
ingress_of() { # role
  case "$1" in
    worker|cleanup) echo "$TARGET_INGRESS" ;;
    *) echo "$ENDPOINT_INGRESS" ;;
  esac
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


# project_number prints the project's number (or a placeholder in a dry run).
project_number() {
  capture 123456789012 gcloud projects describe "$PROJECT" --format='value(projectNumber)'
}
