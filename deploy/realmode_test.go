package deploy_test

import (
	"cmp"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// standIn is a stand-in for gcloud, used only to drive the scripts' real
// (not dry-run) paths: Google answers that no offline gcloud can give
// (NOT_FOUND, PERMISSION_DENIED, an IAM change failing until it propagates).
// It records every call's arguments and answers describes as configured:
//
//	GCLOUD_DESCRIBE=missing  bare describes fail with NOT_FOUND
//	GCLOUD_DESCRIBE=present  bare describes succeed
//	GCLOUD_DESCRIBE=denied   bare describes fail with PERMISSION_DENIED
//	GCLOUD_BINDING_FAILURES=N  the first N IAM binding calls fail
//
// Describes with --format=value(...) print the same values a dry run uses as
// placeholders, so that a real run and a dry run can be compared exactly.
const standIn = `#!/usr/bin/env bash
printf '%s\0' "$(($# + 1))" gcloud "$@" >>"$GCLOUD_LOG"
args=" $* "
case "$args" in
  *"--format=value(projectNumber)"*) echo 123456789012; exit 0 ;;
  *"--format=value(type)"*) echo DATASTORE_MODE; exit 0 ;;
  *"--format=value(serviceConfig.uri)"*)
    for a; do case "$a" in --region=*) region="${a#--region=}" ;; esac; done
    echo "https://${3,,}-PROJECT_NUMBER.$region.run.app"; exit 0 ;;
  *"--format=value(status.url)"*)
    for a; do case "$a" in --region=*) region="${a#--region=}" ;; esac; done
    echo "https://$4-PROJECT_NUMBER.$region.run.app"; exit 0 ;;
  *" describe "*)
    case "$GCLOUD_DESCRIBE" in
      present) exit 0 ;;
      missing) echo "ERROR: (gcloud) NOT_FOUND: Requested entity was not found." >&2; exit 1 ;;
      *) echo "ERROR: (gcloud) PERMISSION_DENIED: The caller does not have permission" >&2; exit 1 ;;
    esac ;;
  *"-policy-binding "*)
    n=$(cat "$GCLOUD_LOG.bindings" 2>/dev/null || echo 0)
    echo $((n + 1)) >"$GCLOUD_LOG.bindings"
    if (( n < ${GCLOUD_BINDING_FAILURES:-0} )); then
      echo "ERROR: (gcloud) INVALID_ARGUMENT: Service account does not exist." >&2; exit 1
    fi ;;
esac
exit 0
`

// withStandIn returns a configuration that puts the stand-in first on PATH,
// and the path of its call log.
func withStandIn(t *testing.T, env map[string]string) (map[string]string, string) {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "gcloud"), []byte(standIn), 0o755); err != nil {
		t.Fatal(err)
	}
	out := map[string]string{
		"PATH":       dir + string(os.PathListSeparator) + os.Getenv("PATH"),
		"GCLOUD_LOG": filepath.Join(dir, "calls"),
	}
	for k, v := range env {
		out[k] = v
	}
	return out, out["GCLOUD_LOG"]
}

func calls(t *testing.T, log string) []command {
	t.Helper()
	b, err := os.ReadFile(log)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return parseCountedArgs(t, b)
}

// TestRealRunMatchesDryRun checks that, given the answers the dry run assumes,
// a real run invokes exactly the commands the dry run printed, in order: on a
// fresh project (every describe says NOT_FOUND), on a rerun (every describe
// succeeds), and for a module of its own deployed with gcloud run deploy.
func TestRealRunMatchesDryRun(t *testing.T) {
	all := scenarios(t)
	for _, s := range append(all[:2:2], all[len(all)-2:]...) {
		t.Run(s.name, func(t *testing.T) {
			dry := dryRun(t, "all.sh", s.args, s.env)

			env := map[string]string{}
			for k, v := range s.env {
				if k != "DRY_RUN" && k != "DRY_RUN_ASSUME_EXISTS" {
					env[k] = v
				}
			}
			env["GCLOUD_DESCRIBE"] = map[bool]string{true: "present", false: "missing"}[s.exists]
			env, log := withStandIn(t, env)
			args := slices.DeleteFunc(slices.Clone(s.args), func(a string) bool { return a == "--dry-run" })
			stdout, stderr, err := runScript(t, "all.sh", args, env)
			if err != nil {
				t.Fatalf("all.sh: %v\n%s", err, stderr)
			}
			if strings.Contains(stdout, "+ gcloud") {
				t.Errorf("a real run printed dry-run lines:\n%s", stdout)
			}
			worker := cmp.Or(s.env["WORKER_FUNCTION"], "Worker")
			first := "deploy: running: + gcloud functions deploy " + worker
			if s.env["DEPLOY_WITH"] == "run" {
				first = "deploy: running: + gcloud run deploy " + strings.ToLower(worker)
			}
			if !strings.Contains(stderr, first) {
				t.Errorf("a real run does not log the commands it runs; stderr:\n%s", stderr)
			}
			real := calls(t, log)
			if !slices.EqualFunc(real, dry, slices.Equal) {
				t.Errorf("real run made %d calls, dry run printed %d; first difference at %d:\n real %v\n  dry %v",
					len(real), len(dry), firstDiff(real, dry), at(real, firstDiff(real, dry)), at(dry, firstDiff(real, dry)))
			}
		})
	}
}

func firstDiff(a, b []command) int {
	for i := range min(len(a), len(b)) {
		if !slices.Equal(a[i], b[i]) {
			return i
		}
	}
	return min(len(a), len(b))
}

func at(c []command, i int) command {
	if i < len(c) {
		return c[i]
	}
	return nil
}

// TestRealRunFailures checks the real-mode paths a dry run cannot reach.
func TestRealRunFailures(t *testing.T) {
	t.Run("a describe failing for another reason than not-found stops the script", func(t *testing.T) {
		env, log := withStandIn(t, map[string]string{"PROJECT": fakeProject, "GCLOUD_DESCRIBE": "denied"})
		_, stderr, err := runScript(t, "04-queue.sh", nil, env)
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 1 {
			t.Fatalf("04-queue.sh: err %v, want exit status 1; stderr:\n%s", err, stderr)
		}
		if !strings.Contains(stderr, "could not check whether a resource exists") || !strings.Contains(stderr, "PERMISSION_DENIED") {
			t.Errorf("stderr does not explain the failure:\n%s", stderr)
		}
		for _, c := range calls(t, log) {
			if !c.is("tasks", "queues", "describe") {
				t.Errorf("ran %s after a failed existence check", c)
			}
		}
	})

	t.Run("IAM changes are retried until the new account propagates", func(t *testing.T) {
		env, log := withStandIn(t, map[string]string{
			"PROJECT": fakeProject, "GCLOUD_DESCRIBE": "missing", "GCLOUD_BINDING_FAILURES": "2", "IAM_RETRY_DELAY": "0",
		})
		_, stderr, err := runScript(t, "03-service-accounts.sh", nil, env)
		if err != nil {
			t.Fatalf("03-service-accounts.sh: %v\n%s", err, stderr)
		}
		n := 0
		for _, c := range calls(t, log) {
			if c.is("projects", "add-iam-policy-binding") {
				n++
			}
		}
		// Datastore access for the Worker's and CleanupLocks' accounts: the
		// first grant fails twice, then both succeed.
		if n != 4 {
			t.Errorf("project binding attempted %d times, want 4 (two failures and a success of the first, then the second)", n)
		}
		if got := strings.Count(stderr, "retrying in 0s"); got != 2 {
			t.Errorf("%d retry notes, want 2; stderr:\n%s", got, stderr)
		}
	})

	t.Run("IAM changes give up after 6 attempts", func(t *testing.T) {
		env, log := withStandIn(t, map[string]string{
			"PROJECT": fakeProject, "GCLOUD_DESCRIBE": "present", "GCLOUD_BINDING_FAILURES": "100", "IAM_RETRY_DELAY": "0",
		})
		_, stderr, err := runScript(t, "06-invokers.sh", nil, env)
		if err == nil {
			t.Fatalf("06-invokers.sh succeeded although every binding failed; stderr:\n%s", stderr)
		}
		if got := len(calls(t, log)); got != 6 {
			t.Errorf("%d calls, want 6 attempts of the first binding and nothing after", got)
		}
	})

	t.Run("a real run needs gcloud", func(t *testing.T) {
		dir := t.TempDir()
		for _, tool := range []string{"bash", "sed", "tr", "grep", "dirname", "basename", "cat"} {
			p, err := exec.LookPath(tool)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(p, filepath.Join(dir, tool)); err != nil {
				t.Fatal(err)
			}
		}
		_, stderr, err := runScript(t, "01-apis.sh", nil, map[string]string{"PATH": dir, "PROJECT": fakeProject})
		if err == nil || !strings.Contains(stderr, "gcloud not found on PATH") {
			t.Errorf("err %v; stderr %q, want a clear 'gcloud not found' error", err, stderr)
		}
	})
}
