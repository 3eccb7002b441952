#!/usr/bin/env bash
# Installs what the test suite needs and is not in go.mod: the real servers the
# tests start (memcached, redis-server, postgresql from Debian), the Datastore emulators
# (they come with the gcloud CLI on this kind of machine and are only checked),
# and staticcheck. Adding a service is one line in the lists below.
set -euo pipefail

apt_packages=(memcached redis-server)     # binary names match the package names
required_files=(
  /usr/lib/google-cloud-sdk/platform/cloud-datastore-emulator/CloudDatastore.jar
  /usr/lib/google-cloud-sdk/platform/cloud-firestore-emulator
)
required_commands=(java gcloud)
staticcheck_version=v0.8.2

missing=()
for p in "${apt_packages[@]}"; do
  command -v "$p" >/dev/null 2>&1 || missing+=("$p")
done
# PostgreSQL (for the SQL fence's tests): Debian keeps its server binaries
# outside PATH, in /usr/lib/postgresql/<version>/bin.
if ! command -v postgres >/dev/null 2>&1 && ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
  missing+=(postgresql)
fi
if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]} from Debian" >&2
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts a system-wide server on install; the tests start their own
  # on free ports and do not use it.
fi

problems=()
for f in "${required_files[@]}"; do
  [ -e "$f" ] || problems+=("missing $f (the gcloud CLI's Datastore emulators)")
done
for c in "${required_commands[@]}"; do
  command -v "$c" >/dev/null 2>&1 || problems+=("missing command $c")
done
if ((${#problems[@]})); then
  printf 'deps: %s\n' "${problems[@]}" >&2
  if [ "${CI:-}" = "true" ]; then exit 1; fi
  echo "deps: the tests that need these will be skipped (they fail when CI=true)" >&2
fi

gobin="$(go env GOPATH)/bin"
if [ ! -x "$gobin/staticcheck" ] || ! "$gobin/staticcheck" -version 2>/dev/null | grep -q "${staticcheck_version#v}"; then
  echo "deps: installing staticcheck $staticcheck_version" >&2
  go install "honnef.co/go/tools/cmd/staticcheck@$staticcheck_version"
fi
