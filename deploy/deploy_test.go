// Package deploy_test checks the deploy/ scripts and cloudbuild.yaml without
// touching any Google Cloud project.
//
// Every script runs in dry-run mode, which prints each gcloud command instead
// of running it. The tests check what those commands do (least-privilege IAM,
// private functions, timeouts, the environment the functions read), then pass
// every distinct command through the gcloud CLI installed here. gcloud parses
// its arguments before it needs credentials, so with an empty configuration
// directory and no account it either rejects the arguments (exit 2, "unrecognized
// arguments", "Invalid value", "Invalid choice") or stops at "You do not
// currently have an active account selected". Only the latter passes.
package deploy_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/redislock"
	"github.com/taskguard/taskguard/tasks/dswait"
	"go.uber.org/goleak"
	"golang.org/x/sync/errgroup"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// fakeProject is a well-formed project id that the checks pass to gcloud;
// without credentials nothing can reach it (or any other project).
const fakeProject = "taskguard-offline-check"

// steps are the deploy scripts in the order all.sh must run them.
var steps = []string{
	"01-apis.sh",
	"02-datastore.sh",
	"03-service-accounts.sh",
	"04-queue.sh",
	"05-functions.sh",
	"06-invokers.sh",
	"07-scheduler.sh",
}

// functionEnvNames are the environment variables the functions read (package app); the
// scripts must pass no other name.
var functionEnvNames = []string{
	"GOOGLE_CLOUD_PROJECT", "TASKGUARD_DATASTORE_DATABASE", "TASKGUARD_DATASTORE_NAMESPACE",
	"TASKGUARD_DATASTORE_KIND", "MEMCACHE_SERVERS", "VALKEY_ADDR",
	"TASKGUARD_QUEUE", "TASKGUARD_WORKER_URL", "TASKGUARD_TASK_SERVICE_ACCOUNT", "TASKGUARD_LEASE",
	"TASKGUARD_CLEANUP_GRACE", "TASKGUARD_BUSY", "TASKGUARD_TASK_DEADLINE",
	redislock.EnvCluster, redislock.EnvTLS, redislock.EnvIAMAuth, redislock.EnvValkeyUsername, redislock.EnvTLSCAFile,
}

// weakEnvNames are the names only the functions that take Weak locks (the
// Worker and EXTRA_FUNCTIONS) get.
var weakEnvNames = []string{
	"MEMCACHE_SERVERS", "VALKEY_ADDR",
	redislock.EnvCluster, redislock.EnvTLS, redislock.EnvIAMAuth, redislock.EnvValkeyUsername, redislock.EnvTLSCAFile,
}

// command is one command line a script would run, split into arguments.
type command []string

func (c command) String() string { return strings.Join(c, " ") }

// words returns the arguments that are not flags: the gcloud command path and
// its positional arguments.
func (c command) words() []string {
	var w []string
	for _, a := range c {
		if !strings.HasPrefix(a, "--") {
			w = append(w, a)
		}
	}
	return w
}

// flag returns the value of --name=value (or "" for a bare --name) and
// whether the flag is present.
func (c command) flag(name string) (string, bool) {
	for _, a := range c {
		if a == "--"+name {
			return "", true
		}
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v, true
		}
	}
	return "", false
}

// is reports whether the command is `gcloud <path...>`.
func (c command) is(path ...string) bool {
	w := c.words()
	return len(w) > len(path) && w[0] == "gcloud" && slices.Equal(w[1:len(path)+1], path)
}

// arg returns the i-th positional argument after the command path of length n.
func (c command) arg(n, i int) string {
	w := c.words()
	if 1+n+i < len(w) {
		return w[1+n+i]
	}
	return ""
}

// shape identifies commands that exercise the same gcloud parsing: the same
// command path and flags, with arguments of the same syntax (runs of letters,
// digits and spaces collapsed, punctuation kept: "tg-run@p.iam..." and
// "taskguard-tasks@q.iam..." are alike; "^;^K=V;K=V" and "K=V,K=V" are not),
// repeated arguments of one syntax counted once. gcloud takes 1-4 s per call
// on a busy machine, so the offline check runs one command per shape.
func (c command) shape() string {
	syntax := regexp.MustCompile(`[A-Za-z0-9 ]+`)
	n := len(c)
	for _, k := range knownCommands {
		if c.is(k...) {
			n = 1 + len(k)
		}
	}
	parts := slices.Clone(c[:min(n, len(c))])
	var rest []string
	for _, a := range c[len(parts):] {
		rest = append(rest, syntax.ReplaceAllString(a, "x"))
	}
	slices.Sort(rest)
	rest = slices.Compact(rest)
	return strings.Join(append(parts, rest...), " ")
}

// scriptEnv is a minimal environment for running a script: nothing from the
// caller's shell leaks in (no project, no credentials) except PATH.
func scriptEnv(t *testing.T, extra map[string]string) []string {
	t.Helper()
	env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir(), "LC_ALL=C.UTF-8"}
	for k, v := range extra {
		env = append(env, k+"="+v)
	}
	return env
}

// runScript runs a deploy script with bash and returns its stdout and stderr.
func runScript(t *testing.T, script string, args []string, env map[string]string) (stdout, stderr string, err error) {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), "bash", append([]string{script}, args...)...)
	cmd.Env = scriptEnv(t, env)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	return out.String(), errb.String(), err
}

// dryRun runs a script in dry-run mode and returns the commands it printed.
// It fails the test if the script fails or prints anything but commands.
func dryRun(t *testing.T, script string, args []string, env map[string]string) []command {
	t.Helper()
	stdout, stderr, err := runScript(t, script, args, env)
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", script, args, err, stderr)
	}
	var lines []string
	for line := range strings.Lines(stdout) {
		line = strings.TrimSuffix(line, "\n")
		rest, ok := strings.CutPrefix(line, "+ ")
		if !ok {
			t.Errorf("%s: dry run printed a line that is not a command: %q", script, line)
			continue
		}
		lines = append(lines, rest)
	}
	return splitShellLines(t, lines)
}

// splitShellLines splits shell-quoted command lines into arguments the way
// bash does, so the test sees exactly what pasting the dry run would run.
func splitShellLines(t *testing.T, lines []string) []command {
	t.Helper()
	if len(lines) == 0 {
		return nil
	}
	const split = `while IFS= read -r line; do eval "set -- $line"; printf '%s\0' "$#" "$@"; done`
	cmd := exec.CommandContext(t.Context(), "bash", "-c", split)
	cmd.Stdin = strings.NewReader(strings.Join(lines, "\n") + "\n")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("splitting dry-run lines: %v", err)
	}
	cmds := parseCountedArgs(t, out)
	if len(cmds) != len(lines) {
		t.Fatalf("split %d lines into %d commands", len(lines), len(cmds))
	}
	return cmds
}

// parseCountedArgs parses a stream of commands written as printf '%s\0' "$#" "$@".
func parseCountedArgs(t *testing.T, out []byte) []command {
	t.Helper()
	if len(out) == 0 {
		return nil
	}
	fields := strings.Split(strings.TrimSuffix(string(out), "\x00"), "\x00")
	var cmds []command
	for len(fields) > 0 {
		n, err := strconv.Atoi(fields[0])
		if err != nil || n > len(fields)-1 {
			t.Fatalf("bad argument count %q in a command stream", fields[0])
		}
		cmds = append(cmds, command(fields[1:1+n]))
		fields = fields[1+n:]
	}
	return cmds
}

// scenario is one configuration of the scripts, run through all.sh.
type scenario struct {
	name   string
	args   []string          // e.g. --dry-run
	env    map[string]string // configuration; DRY_RUN etc. included
	exists bool              // the rerun path: every resource already exists
}

func scenarios(t *testing.T) []scenario {
	t.Helper()
	return []scenario{
		{
			name: "fresh project, defaults",
			env:  map[string]string{"DRY_RUN": "1", "PROJECT": fakeProject},
		},
		{
			name:   "rerun with every option",
			args:   []string{"--dry-run"},
			exists: true,
			env: map[string]string{
				"DRY_RUN_ASSUME_EXISTS":         "1",
				"GOOGLE_CLOUD_PROJECT":          fakeProject,
				"REGION":                        "europe-west1",
				"QUEUE":                         "locks-queue",
				"WORKER_SA":                     "tg-work",
				"ENQUEUE_SA":                    "tg-enq",
				"CLEANUP_SA":                    "tg-clean",
				"TASKS_SA":                      "tg-tasks",
				"SCHEDULER_SA":                  "tg-cron",
				"BUILD_SERVICE_ACCOUNT":         "builder@" + fakeProject + ".iam.gserviceaccount.com",
				"ENQUEUE_INVOKERS":              "serviceAccount:api@other-project.iam.gserviceaccount.com, group:ops@example.com",
				"MAX_INSTANCES":                 "20",
				"MEMORY":                        "4Gi",
				"CPU":                           "2",
				"CONCURRENCY":                   "40",
				"BILLING":                       "instance",
				"WORKER_MIN_INSTANCES":          "2",
				"TARGET_INGRESS":                "all",
				"ENDPOINT_INGRESS":              "internal-and-cloud-load-balancing",
				"TASK_DEADLINE":                 "15m",
				"WORKER_TIMEOUT":                "3600s",
				"CLEANUP_TIMEOUT":               "15m",
				"SCHEDULER_ATTEMPT_DEADLINE":    "900s",
				"ENABLE_TTL":                    "0",
				"VPC_NETWORK":                   "default",
				"VPC_SUBNET":                    "functions",
				"TASKGUARD_DATASTORE_DATABASE":  "locks",
				"TASKGUARD_DATASTORE_NAMESPACE": "prod",
				"TASKGUARD_DATASTORE_KIND":      "Lock",
				"MEMCACHE_SERVERS":              "10.0.0.3:11211,10.0.0.4:11211",
				"VALKEY_ADDR":                   "10.0.1.5:6379",
				"VALKEY_CLUSTER":                "true",
				"VALKEY_TLS":                    "true",
				"VALKEY_USERNAME":               "default",
				"VALKEY_PASSWORD_SECRET":        "valkey-auth:3",
				"VALKEY_TLS_CA_SECRET":          "valkey-ca",
				"TASKGUARD_WORKER_URL":          "https://worker.example.com/run",
				"TASKGUARD_LEASE":               "1m30s",
				"TASKGUARD_CLEANUP_GRACE":       "24h",
				"TASKGUARD_BUSY":                "429",
				"SCHEDULE":                      "0 */6 * * *",
				"SCHEDULE_TIME_ZONE":            "Europe/Paris",
				"QUEUE_MAX_ATTEMPTS":            "-1",
				"QUEUE_MAX_RETRY_DURATION":      "24h",
				"QUEUE_MIN_BACKOFF":             "1s",
				"QUEUE_MAX_BACKOFF":             "10m",
			},
		},
		cloudBuildScenario(t),
		{
			name: "a module of its own, with gcloud run deploy",
			env:  moduleEnv(t, "run"),
		},
		{
			name: "a module of its own, with gcloud functions deploy",
			env:  moduleEnv(t, "functions"),
		},
	}
}

// moduleEnv configures the deploy of a module of its own (the shop, vendored),
// with a public function, Valkey with IAM authentication and a dedicated
// database, by the deploy command given.
func moduleEnv(t *testing.T, with string) map[string]string {
	t.Helper()
	return map[string]string{
		"DRY_RUN":                      "1",
		"PROJECT":                      fakeProject,
		"REGION":                       "europe-west1",
		"SOURCE_DIR":                   vendoredShop(t),
		"DEPLOY_WITH":                  with, // "": the default
		"WORKER_FUNCTION":              "ShopWorker",
		"ENQUEUE_FUNCTION":             "none",
		"CLEANUP_FUNCTION":             "ShopCleanupLocks",
		"EXTRA_FUNCTIONS":              "Checkout:120s Webhook",
		"EXTRA_INVOKERS":               "serviceAccount:web@" + fakeProject + ".iam.gserviceaccount.com",
		"PUBLIC_FUNCTIONS":             "Webhook",
		"VPC_NETWORK":                  "default",
		"VPC_SUBNET":                   "functions",
		"MAX_INSTANCES":                "5",
		"WORKER_MIN_INSTANCES":         "1",
		"TASK_DEADLINE":                "300s",
		"TASKGUARD_DATASTORE_DATABASE": "shop-locks",
		"VALKEY_ADDR":                  "rediss://10.0.1.5:6379",
		"VALKEY_IAM_AUTH":              "true",
		"VALKEY_TLS_CA_SECRET":         "valkey-ca:latest",
	}
}

// shopDir is the example module's directory, the SOURCE_DIR of a project of
// its own.
func shopDir(t *testing.T) string {
	t.Helper()
	d, err := filepath.Abs(filepath.Join("..", "examples", "shop"))
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// vendoredShop is a copy of the example module's root package, go.mod and
// go.sum, as it is uploaded after `go mod vendor`: its vendor/modules.txt
// records the local replace of taskguard (the line `go mod vendor` writes;
// the dry run reads nothing else of vendor/), and a webhook function of its
// own, registered under the name Webhook.
func vendoredShop(t *testing.T) string {
	t.Helper()
	src := shopDir(t)
	dir := t.TempDir()
	files, err := filepath.Glob(filepath.Join(src, "*"))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		name := filepath.Base(f)
		if name != "go.mod" && name != "go.sum" && !strings.HasSuffix(name, ".go") {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	replaced := localReplace(t, filepath.Join(dir, "go.mod"))
	if err := os.MkdirAll(filepath.Join(dir, "vendor"), 0o755); err != nil {
		t.Fatal(err)
	}
	modules := "# github.com/taskguard/taskguard v0.0.0-00010101000000-000000000000 => " + replaced + "\n## explicit; go 1.26\n"
	if err := os.WriteFile(filepath.Join(dir, "vendor", "modules.txt"), []byte(modules), 0o644); err != nil {
		t.Fatal(err)
	}
	webhook := "package shop\n\nimport (\n\t\"net/http\"\n\n\t\"github.com/GoogleCloudPlatform/functions-framework-go/functions\"\n)\n\n" +
		"func init() {\n\tfunctions.HTTP(\"Webhook\", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })\n}\n"
	if err := os.WriteFile(filepath.Join(dir, "webhook.go"), []byte(webhook), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// localReplace returns the local directory go.mod replaces taskguard with.
func localReplace(t *testing.T, gomod string) string {
	t.Helper()
	b, err := os.ReadFile(gomod)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^replace\s+github\.com/taskguard/taskguard\s*=>\s*(\S+)`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("%s replaces taskguard with no local directory", gomod)
	}
	return string(m[1])
}

// expectation is what a scenario's commands must do, computed from its
// configuration and the documented defaults (repeated here on purpose: a
// changed default must be a deliberate change of this test too).
type expectation struct {
	project, region, queue, kind, database string
	dedicatedDatabase                      bool
	worker, enqueue, cleanup               string         // function names; enqueue "" when not deployed
	extras                                 map[string]int // extra function → timeout in seconds
	extraInvokers                          []string
	public                                 map[string]bool
	run                                    bool // DEPLOY_WITH=run
	source                                 string
	workerSA, enqueueSA, cleanupSA         string
	extraSA, tasksSA, schedulerSA          string
	enqueueInvokers                        []string
	env, weakEnv                           map[string]string // every function's; the Worker's and extras' on top
	secrets                                string            // --set-secrets of the Worker and extras; "" none
	secretIDs                              []string
	iamAuth                                bool
	ttl, vpc                               bool
	network, subnet                        string
	deadline, workerTimeout                int // seconds
	profile                                profile
	minWorker                              string
	targetIngress, endpointIngress         string
}

// profile is the instance profile every function gets, in either deploy path.
type profile struct {
	cpu, memory, concurrency, billing, maxInstances string
}

// functions are the names of the functions the scenario deploys.
func (e expectation) functions() []string {
	names := []string{e.worker, e.cleanup}
	if e.enqueue != "" {
		names = append(names, e.enqueue)
	}
	for name := range e.extras {
		names = append(names, name)
	}
	return names
}

// role returns the role of the function name: worker, enqueue, cleanup or extra.
func (e expectation) role(name string) string {
	switch name {
	case e.worker:
		return "worker"
	case e.enqueue:
		return "enqueue"
	case e.cleanup:
		return "cleanup"
	}
	return "extra"
}

// serviceAccount returns the account the function runs as.
func (e expectation) serviceAccount(name string) string {
	return map[string]string{"worker": e.workerSA, "enqueue": e.enqueueSA, "cleanup": e.cleanupSA, "extra": e.extraSA}[e.role(name)]
}

// weak reports whether the function takes Weak locks.
func (e expectation) weak(name string) bool {
	r := e.role(name)
	return r == "worker" || r == "extra"
}

func expect(s scenario) expectation {
	get := func(k, def string) string {
		if v, ok := s.env[k]; ok && v != "" {
			return v
		}
		return def
	}
	project := get("PROJECT", get("GOOGLE_CLOUD_PROJECT", ""))
	region := get("REGION", "us-central1")
	email := func(id string) string { return id + "@" + project + ".iam.gserviceaccount.com" }
	deadline, _ := seconds(get("TASK_DEADLINE", "1800s"))
	workerTimeout, _ := seconds(get("WORKER_TIMEOUT", get("TASK_DEADLINE", "1800s")))
	e := expectation{
		project:           project,
		region:            region,
		queue:             get("QUEUE", "taskguard"),
		kind:              get("TASKGUARD_DATASTORE_KIND", "TaskguardLock"),
		database:          get("TASKGUARD_DATASTORE_DATABASE", "(default)"),
		dedicatedDatabase: get("TASKGUARD_DATASTORE_DATABASE", "") != "",
		workerSA:          email(get("WORKER_SA", "taskguard-worker")),
		enqueueSA:         email(get("ENQUEUE_SA", "taskguard-enqueue")),
		cleanupSA:         email(get("CLEANUP_SA", "taskguard-cleanup")),
		extraSA:           email(get("EXTRA_SA", "taskguard-extra")),
		tasksSA:           email(get("TASKS_SA", "taskguard-tasks")),
		schedulerSA:       email(get("SCHEDULER_SA", "taskguard-scheduler")),
		ttl:               get("ENABLE_TTL", "1") == "1",
		network:           get("VPC_NETWORK", ""),
		subnet:            get("VPC_SUBNET", ""),
		deadline:          deadline,
		workerTimeout:     workerTimeout,
		worker:            get("WORKER_FUNCTION", "Worker"),
		enqueue:           get("ENQUEUE_FUNCTION", "Enqueue"),
		cleanup:           get("CLEANUP_FUNCTION", "CleanupLocks"),
		extras:            map[string]int{},
		public:            map[string]bool{},
		run:               get("DEPLOY_WITH", "functions") == "run",
		source:            get("SOURCE_DIR", ""),
		iamAuth:           get("VALKEY_IAM_AUTH", "") == "true",
		profile: profile{
			cpu:          get("CPU", "1"),
			memory:       get("MEMORY", "512Mi"),
			concurrency:  get("CONCURRENCY", "80"),
			billing:      get("BILLING", "request"),
			maxInstances: get("MAX_INSTANCES", ""),
		},
		minWorker:       get("WORKER_MIN_INSTANCES", "0"),
		targetIngress:   get("TARGET_INGRESS", "internal"),
		endpointIngress: get("ENDPOINT_INGRESS", "all"),
	}
	if e.enqueue == "none" {
		e.enqueue = ""
	}
	for _, f := range strings.Fields(get("EXTRA_FUNCTIONS", "")) {
		name, timeout, ok := strings.Cut(f, ":")
		if !ok {
			timeout = "60s"
		}
		d, _ := seconds(timeout)
		e.extras[name] = d
	}
	for _, f := range strings.Fields(get("PUBLIC_FUNCTIONS", "")) {
		e.public[f] = true
	}
	for m := range strings.SplitSeq(get("EXTRA_INVOKERS", ""), ",") {
		if m = strings.TrimSpace(m); m != "" {
			e.extraInvokers = append(e.extraInvokers, m)
		}
	}
	e.vpc = e.network != ""
	for m := range strings.SplitSeq(get("ENQUEUE_INVOKERS", ""), ",") {
		if m = strings.TrimSpace(m); m != "" {
			e.enqueueInvokers = append(e.enqueueInvokers, m)
		}
	}
	e.env = map[string]string{
		"GOOGLE_CLOUD_PROJECT":           project,
		"TASKGUARD_DATASTORE_KIND":       e.kind,
		"TASKGUARD_QUEUE":                "projects/" + project + "/locations/" + region + "/queues/" + e.queue,
		"TASKGUARD_WORKER_URL":           get("TASKGUARD_WORKER_URL", "https://"+strings.ToLower(e.worker)+"-123456789012."+region+".run.app"),
		"TASKGUARD_TASK_SERVICE_ACCOUNT": e.tasksSA,
		"TASKGUARD_TASK_DEADLINE":        strconv.Itoa(deadline) + "s",
		"TASKGUARD_LEASE":                get("TASKGUARD_LEASE", locking.DefaultLease.String()),
		"TASKGUARD_CLEANUP_GRACE":        get("TASKGUARD_CLEANUP_GRACE", "1h"),
	}
	for _, k := range []string{"TASKGUARD_DATASTORE_DATABASE", "TASKGUARD_DATASTORE_NAMESPACE", "TASKGUARD_BUSY"} {
		if v := get(k, ""); v != "" {
			e.env[k] = v
		}
	}
	e.weakEnv = map[string]string{}
	for _, k := range []string{"MEMCACHE_SERVERS", "VALKEY_ADDR", "VALKEY_CLUSTER", "VALKEY_TLS", "VALKEY_IAM_AUTH", "VALKEY_USERNAME"} {
		if v := get(k, ""); v != "" {
			e.weakEnv[k] = v
		}
	}
	ref := func(v string) string {
		if strings.Contains(v, ":") {
			return v
		}
		return v + ":latest"
	}
	var secrets []string
	if v := get("VALKEY_PASSWORD_SECRET", ""); v != "" {
		secrets = append(secrets, "VALKEY_PASSWORD="+ref(v))
		e.secretIDs = append(e.secretIDs, strings.Split(v, ":")[0])
	}
	if v := get("VALKEY_TLS_CA_SECRET", ""); v != "" {
		secrets = append(secrets, "/secrets/valkey-ca/ca.pem="+ref(v))
		e.secretIDs = append(e.secretIDs, strings.Split(v, ":")[0])
		e.weakEnv[redislock.EnvTLSCAFile] = "/secrets/valkey-ca/ca.pem"
	}
	e.secrets = strings.Join(secrets, ",")
	return e
}

// parseEnvVars parses a --set-env-vars value, including gcloud's alternate
// delimiter syntax "^D^K=V D K=V".
func parseEnvVars(v string) (map[string]string, error) {
	delim := ","
	if strings.HasPrefix(v, "^") {
		d, rest, ok := strings.Cut(v[1:], "^")
		if !ok || d == "" {
			return nil, fmt.Errorf("bad delimiter syntax in %q", v)
		}
		delim, v = d, rest
	}
	env := map[string]string{}
	for kv := range strings.SplitSeq(v, delim) {
		k, val, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("bad pair %q", kv)
		}
		if _, dup := env[k]; dup {
			return nil, fmt.Errorf("duplicate name %q", k)
		}
		env[k] = val
	}
	return env, nil
}

// seconds parses a gcloud duration in whole s, m or h.
func seconds(v string) (int, error) {
	m := regexp.MustCompile(`^(\d+)([smh])$`).FindStringSubmatch(v)
	if m == nil {
		return 0, fmt.Errorf("duration %q not in s, m or h", v)
	}
	n, _ := strconv.Atoi(m[1])
	return n * map[string]int{"s": 1, "m": 60, "h": 3600}[m[2]], nil
}

// knownCommands are the gcloud command paths the scripts may use; anything
// else (a new command, a typo in a command group) must be reviewed here.
var knownCommands = [][]string{
	{"services", "enable"},
	{"firestore", "databases", "describe"},
	{"firestore", "databases", "create"},
	{"firestore", "fields", "ttls", "update"},
	{"iam", "service-accounts", "describe"},
	{"iam", "service-accounts", "create"},
	{"iam", "service-accounts", "add-iam-policy-binding"},
	{"secrets", "add-iam-policy-binding"},
	{"projects", "describe"},
	{"projects", "add-iam-policy-binding"},
	{"tasks", "queues", "describe"},
	{"tasks", "queues", "create"},
	{"tasks", "queues", "update"},
	{"tasks", "queues", "add-iam-policy-binding"},
	{"functions", "describe"},
	{"functions", "deploy"},
	{"functions", "add-invoker-policy-binding"},
	{"run", "services", "update"},
	{"run", "services", "describe"},
	{"run", "services", "add-iam-policy-binding"},
	{"run", "deploy"},
	{"scheduler", "jobs", "describe"},
	{"scheduler", "jobs", "create", "http"},
	{"scheduler", "jobs", "update", "http"},
}

type binding struct{ resource, member, role, condition string }

// deployed is what one function gets, read from its deploy command and, on
// the functions path, the `run services update` after it: the same fields
// in both deploy paths.
type deployed struct {
	profile
	serviceAccount, timeout, minInstances, ingress, auth, secrets string
	env                                                           map[string]string
	vpc                                                           bool
}

// plan is what a scenario's commands do, by function and in IAM.
type plan struct {
	bindings []binding
	deploys  map[string]command  // function → its deploy command
	settings map[string]deployed // function → what it gets
}

// functionsIngress maps gcloud functions deploy's --ingress-settings to the
// names of gcloud run deploy's --ingress.
var functionsIngress = map[string]string{"internal-only": "internal", "all": "all", "internal-and-gclb": "internal-and-cloud-load-balancing"}

// readDeploy fills in the settings a deploy command gives, in run deploy's terms.
func readDeploy(t *testing.T, c command) deployed {
	t.Helper()
	d := deployed{}
	d.cpu, _ = c.flag("cpu")
	d.memory, _ = c.flag("memory")
	d.concurrency, _ = c.flag("concurrency")
	d.maxInstances, _ = c.flag("max-instances")
	d.minInstances, _ = c.flag("min-instances")
	d.serviceAccount, _ = c.flag("service-account")
	d.timeout, _ = c.flag("timeout")
	d.secrets, _ = c.flag("set-secrets")
	if ing, ok := c.flag("ingress"); ok {
		d.ingress = ing
	} else if ing, ok := c.flag("ingress-settings"); ok {
		d.ingress = "functions:" + ing
		if v, known := functionsIngress[ing]; known {
			d.ingress = v
		}
	}
	_, open := c.flag("allow-unauthenticated")
	_, closed := c.flag("no-allow-unauthenticated")
	switch {
	case open && !closed:
		d.auth = "public"
	case closed && !open:
		d.auth = "private"
	default:
		d.auth = fmt.Sprintf("ambiguous (allow %v, no-allow %v)", open, closed)
	}
	readBilling(&d, c)
	env, err := parseEnvVars(must(c.flag("set-env-vars")))
	if err != nil {
		t.Errorf("--set-env-vars: %v: %s", err, c)
	}
	d.env = env
	return d
}

// readBilling reads --cpu-throttling (request-based billing) or
// --no-cpu-throttling (instance-based) and Direct VPC egress.
func readBilling(d *deployed, c command) {
	_, throttled := c.flag("cpu-throttling")
	_, always := c.flag("no-cpu-throttling")
	switch {
	case throttled && !always:
		d.billing = "request"
	case always && !throttled:
		d.billing = "instance"
	}
	if _, ok := c.flag("network"); ok {
		d.vpc = true
	}
}

// checkPlan checks what a scenario's commands would do, and returns them
// read by function.
func checkPlan(t *testing.T, s scenario, cmds []command) plan {
	t.Helper()
	e := expect(s)
	var (
		bindings  []binding
		deploys   = map[string]command{}
		settings  = map[string]deployed{}
		updated   = map[string]command{} // service → run services update
		vpc       = map[string]bool{}
		timeouts  = map[string]int{}
		count     = map[string]int{}
		ttlGroups = map[string]bool{}
	)
	for _, c := range cmds {
		if c[0] != "gcloud" {
			t.Errorf("not a gcloud command: %s", c)
			continue
		}
		var path []string
		for _, k := range knownCommands {
			if c.is(k...) {
				path = k
			}
		}
		if path == nil {
			t.Errorf("command not reviewed by this test: %s", c)
			continue
		}
		count[strings.Join(path, " ")]++
		if p, ok := c.flag("project"); ok {
			if p != e.project {
				t.Errorf("--project=%s, want %s: %s", p, e.project, c)
			}
		} else if !(path[0] == "projects" && c.arg(2, 0) == e.project) {
			t.Errorf("command does not name project %s: %s", e.project, c)
		}
		member, _ := c.flag("member")
		role, _ := c.flag("role")
		switch strings.Join(path, " ") {
		case "projects add-iam-policy-binding":
			cond, ok := c.flag("condition")
			if !ok {
				t.Errorf("a project-level grant without --condition (None or a condition) prompts when the policy has conditions: %s", c)
			}
			bindings = append(bindings, binding{"project " + c.arg(2, 0), member, role, cond})
		case "iam service-accounts add-iam-policy-binding":
			bindings = append(bindings, binding{"service account " + c.arg(3, 0), member, role, ""})
		case "secrets add-iam-policy-binding":
			bindings = append(bindings, binding{"secret " + c.arg(2, 0), member, role, ""})
		case "tasks queues add-iam-policy-binding":
			loc, _ := c.flag("location")
			bindings = append(bindings, binding{"queue " + loc + "/" + c.arg(3, 0), member, role, ""})
		case "functions add-invoker-policy-binding":
			reg, _ := c.flag("region")
			bindings = append(bindings, binding{"function " + reg + "/" + strings.ToLower(c.arg(2, 0)), member, "roles/run.invoker", ""})
		case "run services add-iam-policy-binding":
			reg, _ := c.flag("region")
			bindings = append(bindings, binding{"function " + reg + "/" + c.arg(3, 0), member, role, ""})
		case "functions deploy":
			name := c.arg(2, 0)
			if _, dup := deploys[name]; dup {
				t.Errorf("%s deployed twice", name)
			}
			deploys[name] = c
			settings[name] = readDeploy(t, c)
		case "run deploy":
			name, _ := c.flag("function")
			if _, dup := deploys[name]; dup {
				t.Errorf("%s deployed twice", name)
			}
			if c.arg(2, 0) != strings.ToLower(name) {
				t.Errorf("%s deployed as service %q, want its name in lower case: %s", name, c.arg(2, 0), c)
			}
			deploys[name] = c
			settings[name] = readDeploy(t, c)
			if e.vpc {
				net, _ := c.flag("network")
				sub, _ := c.flag("subnet")
				egress, _ := c.flag("vpc-egress")
				if net != e.network || sub != e.subnet || egress != "private-ranges-only" {
					t.Errorf("VPC egress: got network=%q subnet=%q egress=%q, want %q %q private-ranges-only: %s", net, sub, egress, e.network, e.subnet, c)
				}
				vpc[c.arg(2, 0)] = true
			}
		case "run services update":
			if _, ok := c.flag("network"); ok || e.vpc {
				net, _ := c.flag("network")
				sub, _ := c.flag("subnet")
				egress, _ := c.flag("vpc-egress")
				if net != e.network || sub != e.subnet || egress != "private-ranges-only" {
					t.Errorf("VPC egress: got network=%q subnet=%q egress=%q, want %q %q private-ranges-only: %s", net, sub, egress, e.network, e.subnet, c)
				}
				vpc[c.arg(3, 0)] = true
			}
			updated[c.arg(3, 0)] = c
		case "firestore databases create":
			if v, _ := c.flag("type"); v != "datastore-mode" {
				t.Errorf("database type %q, want datastore-mode: %s", v, c)
			}
		case "firestore fields ttls update":
			group, _ := c.flag("collection-group")
			db, _ := c.flag("database")
			if _, on := c.flag("enable-ttl"); !on || c.arg(4, 0) != "expiresAt" || (group != e.kind && !slices.Contains(dswait.Kinds, group)) || db != e.database {
				t.Errorf("TTL policy must enable TTL on %s.expiresAt or one of %v in database %s: %s", e.kind, dswait.Kinds, e.database, c)
			}
			ttlGroups[group] = true
		case "tasks queues create", "tasks queues update":
			if c.arg(3, 0) != e.queue {
				t.Errorf("queue %q, want %q: %s", c.arg(3, 0), e.queue, c)
			}
			for _, f := range []string{"location", "max-attempts", "max-retry-duration", "min-backoff", "max-backoff", "max-doublings", "max-dispatches-per-second", "max-concurrent-dispatches"} {
				if _, ok := c.flag(f); !ok {
					t.Errorf("queue settings lack --%s: %s", f, c)
				}
			}
		case "scheduler jobs create http", "scheduler jobs update http":
			uri, _ := c.flag("uri")
			aud, _ := c.flag("oidc-token-audience")
			sa, _ := c.flag("oidc-service-account-email")
			method, _ := c.flag("http-method")
			sched, _ := c.flag("schedule")
			if uri == "" || aud != uri {
				t.Errorf("OIDC audience %q must equal the URI %q: %s", aud, uri, c)
			}
			if !strings.Contains(uri, "https://"+strings.ToLower(e.cleanup)+"-") {
				t.Errorf("scheduler URI %q is not %s's URL", uri, e.cleanup)
			}
			if sa != e.schedulerSA || method != "POST" || len(strings.Fields(sched)) != 5 {
				t.Errorf("scheduler job: want OIDC as %s, POST, a 5-field schedule: %s", e.schedulerSA, c)
			}
			d, err := seconds(must(c.flag("attempt-deadline")))
			if err != nil {
				t.Error(err)
			}
			timeouts["scheduler"] = d
		case "services enable":
			apis := []string{"cloudfunctions", "run", "cloudbuild", "artifactregistry", "cloudtasks", "cloudscheduler", "datastore", "firestore", "iam", "logging"}
			if len(e.secretIDs) > 0 {
				apis = append(apis, "secretmanager")
			}
			for _, api := range apis {
				if !slices.Contains(c, api+".googleapis.com") {
					t.Errorf("API %s is not enabled: %s", api, c)
				}
			}
		}
	}
	// On the functions path, billing and VPC egress come from the service update.
	for name, d := range settings {
		if c, ok := updated[strings.ToLower(name)]; ok && !e.run {
			readBilling(&d, c)
			settings[name] = d
		}
	}

	// Creates on a fresh project, updates on a rerun; never both.
	fresh, rerun := 1, 0
	if s.exists {
		fresh, rerun = 0, 1
	}
	accounts := 4 // Worker, CleanupLocks, Cloud Tasks, Cloud Scheduler
	if e.enqueue != "" {
		accounts++
	}
	if len(e.extras) > 0 {
		accounts++
	}
	for path, want := range map[string]int{
		"firestore databases create":   fresh,
		"iam service-accounts create":  accounts * fresh,
		"tasks queues create":          fresh,
		"tasks queues update":          rerun,
		"scheduler jobs create http":   fresh,
		"scheduler jobs update http":   rerun,
		"services enable":              1,
		"firestore fields ttls update": map[bool]int{true: 1 + len(dswait.Kinds), false: 0}[e.ttl],
		"run services update":          map[bool]int{true: 0, false: len(e.functions())}[e.run],
		"run deploy":                   map[bool]int{true: len(e.functions()), false: 0}[e.run],
	} {
		if count[path] != want {
			t.Errorf("%d × gcloud %s, want %d", count[path], path, want)
		}
	}
	if e.ttl && !ttlGroups[e.kind] {
		t.Errorf("TTL policies on %v; want one on the lock kind %s", ttlGroups, e.kind)
	}
	for _, k := range dswait.Kinds {
		if e.ttl && !ttlGroups[k] {
			t.Errorf("TTL policies on %v; want one on park mode's %s", ttlGroups, k)
		}
	}

	// Least privilege: one account per function, exactly these grants.
	sa := func(email string) string { return "serviceAccount:" + email }
	datastoreCond := "None"
	if e.dedicatedDatabase {
		datastoreCond = `expression=resource.name == "projects/` + e.project + `/databases/` + e.database + `",title=taskguard database ` + e.database + ` only`
	}
	datastoreUsers := []string{e.workerSA, e.cleanupSA}
	taskCreators := []string{e.workerSA}
	weakUsers := []string{e.workerSA}
	if e.enqueue != "" {
		taskCreators = append(taskCreators, e.enqueueSA)
	}
	if len(e.extras) > 0 {
		datastoreUsers = append(datastoreUsers, e.extraSA)
		taskCreators = append(taskCreators, e.extraSA)
		weakUsers = append(weakUsers, e.extraSA)
	}
	wantBindings := []binding{
		{"function " + e.region + "/" + strings.ToLower(e.worker), sa(e.tasksSA), "roles/run.invoker", ""},
		{"function " + e.region + "/" + strings.ToLower(e.cleanup), sa(e.schedulerSA), "roles/run.invoker", ""},
	}
	for _, u := range datastoreUsers {
		wantBindings = append(wantBindings, binding{"project " + e.project, sa(u), "roles/datastore.user", datastoreCond})
	}
	for _, u := range taskCreators {
		wantBindings = append(wantBindings,
			binding{"service account " + e.tasksSA, sa(u), "roles/iam.serviceAccountUser", ""},
			binding{"queue " + e.region + "/" + e.queue, sa(u), "roles/cloudtasks.enqueuer", ""})
	}
	for _, u := range weakUsers {
		for _, id := range e.secretIDs {
			wantBindings = append(wantBindings, binding{"secret " + id, sa(u), "roles/secretmanager.secretAccessor", ""})
		}
		if e.iamAuth {
			wantBindings = append(wantBindings, binding{"project " + e.project, sa(u), "roles/memorystore.dbConnectionUser", "None"})
		}
	}
	for _, m := range e.enqueueInvokers {
		wantBindings = append(wantBindings, binding{"function " + e.region + "/" + strings.ToLower(e.enqueue), m, "roles/run.invoker", ""})
	}
	for name := range e.extras {
		for _, m := range e.extraInvokers {
			wantBindings = append(wantBindings, binding{"function " + e.region + "/" + strings.ToLower(name), m, "roles/run.invoker", ""})
		}
	}
	sortBindings := func(b []binding) {
		slices.SortFunc(b, func(x, y binding) int {
			return strings.Compare(x.resource+x.member+x.role+x.condition, y.resource+y.member+y.role+y.condition)
		})
	}
	sortBindings(bindings)
	sortBindings(wantBindings)
	if !slices.Equal(bindings, wantBindings) {
		t.Errorf("IAM bindings:\n got %v\nwant %v", bindings, wantBindings)
	}
	for _, b := range bindings {
		if strings.HasPrefix(b.member, "allUsers") || strings.HasPrefix(b.member, "allAuthenticatedUsers") {
			t.Errorf("a grant to %s: public functions are opened by PUBLIC_FUNCTIONS alone: %v", b.member, b)
		}
	}

	// The functions: gen2, go126, each its own account, one profile, the right
	// env, timeouts that fit.
	names := e.functions()
	if len(deploys) != len(names) {
		t.Errorf("%d functions deployed, want %d (%v)", len(deploys), len(names), names)
	}
	for _, name := range names {
		c, ok := deploys[name]
		if !ok {
			t.Errorf("%s is not deployed", name)
			continue
		}
		d := settings[name]
		flags := []string{"gen2", "trigger-http"}
		want := map[string]string{"entry-point": name, "runtime": "go126", "region": e.region}
		if e.run {
			flags = nil
			want = map[string]string{"function": name, "base-image": "go126", "region": e.region}
		}
		if e.source != "" {
			want["source"] = e.source
		}
		for _, f := range flags {
			if v, ok := c.flag(f); !ok || v != "" {
				t.Errorf("%s: want --%s: %s", name, f, c)
			}
		}
		for f, want := range want {
			if v, _ := c.flag(f); v != want {
				t.Errorf("%s: --%s=%q, want %q", name, f, v, want)
			}
		}
		wantAuth := map[bool]string{true: "public", false: "private"}[e.public[name]]
		if d.auth != wantAuth {
			t.Errorf("%s: %s, want %s: %s", name, d.auth, wantAuth, c)
		}
		if d.serviceAccount != e.serviceAccount(name) {
			t.Errorf("%s runs as %q, want its own account %q", name, d.serviceAccount, e.serviceAccount(name))
		}
		if d.profile != e.profile {
			t.Errorf("%s: profile %+v, want %+v", name, d.profile, e.profile)
		}
		if cpu, _ := strconv.Atoi(d.cpu); cpu < 1 {
			t.Errorf("%s: --cpu=%q, want at least 1 vCPU", name, d.cpu)
		}
		wantMin := "0"
		if name == e.worker {
			wantMin = e.minWorker
		}
		if d.minInstances != wantMin {
			t.Errorf("%s: --min-instances=%q, want %q", name, d.minInstances, wantMin)
		}
		wantIngress := e.endpointIngress
		if name == e.worker || name == e.cleanup {
			wantIngress = e.targetIngress
		}
		if d.ingress != wantIngress {
			t.Errorf("%s: ingress %q, want %q", name, d.ingress, wantIngress)
		}
		secrets := ""
		if e.weak(name) {
			secrets = e.secrets
		}
		if d.secrets != secrets {
			t.Errorf("%s: --set-secrets=%q, want %q", name, d.secrets, secrets)
		}
		dur, err := seconds(d.timeout)
		if err != nil {
			t.Errorf("%s: %v", name, err)
		}
		if want, extra := e.extras[name]; extra && dur != want {
			t.Errorf("%s: --timeout=%ds, want %ds", name, dur, want)
		}
		role := map[string]string{e.worker: "Worker", e.cleanup: "CleanupLocks"}[name]
		if role != "" {
			timeouts[role] = dur
		}
		for k := range d.env {
			if !slices.Contains(functionEnvNames, k) {
				t.Errorf("%s: environment variable %s is not one the functions read", name, k)
			}
			if k == redislock.EnvValkeyPassword {
				t.Errorf("%s: the Valkey password is a plain environment variable", name)
			}
		}
		if !e.weak(name) {
			for _, k := range weakEnvNames {
				if _, ok := d.env[k]; ok {
					t.Errorf("%s takes no Weak locks but gets %s", name, k)
				}
			}
		}
		wantEnv := maps.Clone(e.env)
		if e.weak(name) {
			maps.Copy(wantEnv, e.weakEnv)
		}
		if !maps.Equal(d.env, wantEnv) {
			t.Errorf("%s environment:\n got %v\nwant %v", name, d.env, wantEnv)
		}
		if e.vpc && !vpc[strings.ToLower(name)] {
			t.Errorf("%s has no Direct VPC egress", name)
		}
	}
	if timeouts["Worker"] != e.workerTimeout || timeouts["Worker"] < e.deadline {
		t.Errorf("Worker timeout %ds, want %ds, at least the dispatch deadline %ds: the platform would cut a request Cloud Tasks still waits for", timeouts["Worker"], e.workerTimeout, e.deadline)
	}
	if timeouts["Worker"] > 3600 || timeouts["CleanupLocks"] > 3600 {
		t.Errorf("HTTP function timeouts above 3600s: %v", timeouts)
	}
	if timeouts["scheduler"] > timeouts["CleanupLocks"] {
		t.Errorf("scheduler attempt deadline %ds exceeds CleanupLocks' timeout %ds", timeouts["scheduler"], timeouts["CleanupLocks"])
	}
	return plan{bindings: bindings, deploys: deploys, settings: settings}
}

func must(v string, _ bool) string { return v }

// TestDryRunPlans runs all.sh in dry-run mode for each scenario and checks
// what its commands would do.
func TestDryRunPlans(t *testing.T) {
	for _, s := range scenarios(t) {
		t.Run(s.name, func(t *testing.T) {
			checkPlan(t, s, dryRun(t, "all.sh", s.args, s.env))
		})
	}
}

// TestAllRunsEveryStepInOrder checks that all.sh runs exactly the numbered
// scripts in deploy/, in order, and prints the same commands as running each
// of them alone.
func TestAllRunsEveryStepInOrder(t *testing.T) {
	found, err := filepath.Glob("[0-9][0-9]-*.sh")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(found, steps) {
		t.Fatalf("numbered scripts in deploy/ are %v, want %v", found, steps)
	}
	if got := allSteps(t); !slices.Equal(got, steps) {
		t.Fatalf("all.sh runs %v, want %v", got, steps)
	}
	env := map[string]string{"DRY_RUN": "1", "PROJECT": fakeProject}
	var each []command
	for _, step := range steps {
		cmds := dryRun(t, step, nil, env)
		if len(cmds) == 0 {
			t.Errorf("%s printed no command in a dry run", step)
		}
		each = append(each, cmds...)
	}
	all := dryRun(t, "all.sh", nil, env)
	if !slices.EqualFunc(all, each, slices.Equal) {
		t.Errorf("all.sh printed %d commands; the steps alone printed %d, or in another order", len(all), len(each))
	}
}

// allSteps reads the steps=( ... ) list out of all.sh.
func allSteps(t *testing.T) []string {
	t.Helper()
	src, err := os.ReadFile("all.sh")
	if err != nil {
		t.Fatal(err)
	}
	block := regexp.MustCompile(`(?s)\nsteps=\((.*?)\n\)`).FindSubmatch(src)
	if block == nil {
		t.Fatal("all.sh has no steps=( ... ) list")
	}
	return strings.Fields(string(block[1]))
}

// configNames reads the configuration variables lib.sh declares with defaults.
func configNames(t *testing.T) []string {
	t.Helper()
	src, err := os.ReadFile("lib.sh")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range regexp.MustCompile(`(?m)^: "\$\{([A-Z_][A-Z0-9_]*):=`).FindAllSubmatch(src, -1) {
		names = append(names, string(m[1]))
	}
	if len(names) < 20 {
		t.Fatalf("found only %d configuration variables in lib.sh", len(names))
	}
	return names
}

// TestReadmeDocumentsEveryVariable keeps deploy/README.md's configuration
// table in step with lib.sh.
func TestReadmeDocumentsEveryVariable(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range append(configNames(t), "DRY_RUN", "DRY_RUN_ASSUME_EXISTS") {
		if !bytes.Contains(readme, []byte("`"+name+"`")) {
			t.Errorf("deploy/README.md does not document %s", name)
		}
	}
	for _, step := range steps {
		if !bytes.Contains(readme, []byte(step)) {
			t.Errorf("deploy/README.md does not mention %s", step)
		}
	}
}

// TestScriptsRejectBadConfiguration checks the values gcloud accepts offline
// but Google would refuse (or that would break the locking guarantees) stop the
// scripts before any command is printed.
func TestScriptsRejectBadConfiguration(t *testing.T) {
	base := map[string]string{"DRY_RUN": "1", "PROJECT": fakeProject}
	with := func(kv ...string) map[string]string {
		m := map[string]string{}
		for k, v := range base {
			m[k] = v
		}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	tests := []struct {
		name   string
		script string
		args   []string
		env    map[string]string
		stderr string
		exit   int
	}{
		{"no project", "all.sh", nil, map[string]string{"DRY_RUN": "1"}, "PROJECT is not set", 1},
		{"bad project id", "01-apis.sh", nil, with("PROJECT", "My_Project"), "is not a project id", 1},
		{"unknown argument", "all.sh", []string{"--dryrun"}, base, "unknown argument: --dryrun", 2},
		{"timeout syntax", "05-functions.sh", nil, with("WORKER_TIMEOUT", "30min"), "want a whole number", 1},
		{"timeout above an hour", "05-functions.sh", nil, with("WORKER_TIMEOUT", "2h"), "WORKER_TIMEOUT must be between", 1},
		{"attempt deadline above cleanup timeout", "07-scheduler.sh", nil, with("SCHEDULER_ATTEMPT_DEADLINE", "900s"), "must not exceed CLEANUP_TIMEOUT", 1},
		{"attempt deadline above 30 min", "07-scheduler.sh", nil, with("CLEANUP_TIMEOUT", "3600s", "SCHEDULER_ATTEMPT_DEADLINE", "3600s"), "SCHEDULER_ATTEMPT_DEADLINE must be between", 1},
		{"lease not a Go duration", "05-functions.sh", nil, with("TASKGUARD_LEASE", "60"), "not a Go duration", 1},
		{"busy mode unknown", "05-functions.sh", nil, with("TASKGUARD_BUSY", "wait"), "TASKGUARD_BUSY=wait: want park or 429", 1},
		{"network without subnet", "05-functions.sh", nil, with("VPC_NETWORK", "default"), "both VPC_NETWORK and VPC_SUBNET", 1},
		{"service account id", "03-service-accounts.sh", nil, with("WORKER_SA", "Worker_SA"), "must be 6-30 lowercase", 1},
		{"one account for every function", "all.sh", nil, with("RUNTIME_SA", "taskguard-runtime"), "RUNTIME_SA (one account for every function) is replaced by one account per function", 1},
		{"one account for two roles", "all.sh", nil, with("CLEANUP_SA", "taskguard-worker"), "service account 'taskguard-worker' is named for two roles", 1},
		{"invoker not a member", "06-invokers.sh", nil, with("ENQUEUE_INVOKERS", "bob@example.com"), "is not an IAM member", 1},
		{"semicolon in an env value", "05-functions.sh", nil, with("TASKGUARD_DATASTORE_NAMESPACE", "a;b"), "TASKGUARD_DATASTORE_NAMESPACE must not contain ';'", 1},
		{"queue attempts", "04-queue.sh", nil, with("QUEUE_MAX_ATTEMPTS", "0"), "QUEUE_MAX_ATTEMPTS=0", 1},
		// A webhook made public as a new user would try it: refused before step 01, with the way that works.
		{"allUsers as an extra invoker", "all.sh", nil, with("EXTRA_FUNCTIONS", "Checkout", "EXTRA_INVOKERS", "allUsers"), "EXTRA_INVOKERS: 'allUsers' is not an IAM member this variable takes: to let anyone call one of your functions (a webhook), list it in PUBLIC_FUNCTIONS", 1},
		{"allUsers as an Enqueue invoker", "all.sh", nil, with("ENQUEUE_INVOKERS", "group:ops@example.com,allUsers"), "ENQUEUE_INVOKERS: 'allUsers' is not an IAM member this variable takes", 1},
		{"Worker made public", "all.sh", nil, with("PUBLIC_FUNCTIONS", "Worker"), "PUBLIC_FUNCTIONS: 'Worker' is not one of EXTRA_FUNCTIONS", 1},
		{"public function behind internal ingress", "all.sh", nil, with("EXTRA_FUNCTIONS", "Hook", "PUBLIC_FUNCTIONS", "Hook", "ENDPOINT_INGRESS", "internal"), "PUBLIC_FUNCTIONS needs ENDPOINT_INGRESS=all", 1},
		{"extra function the module does not register", "all.sh", nil, with("EXTRA_FUNCTIONS", "Checkout"), "does not register a function named Checkout", 1},
		{"timeout below the dispatch deadline", "all.sh", nil, with("WORKER_TIMEOUT", "600s"), "WORKER_TIMEOUT (600s) is below TASK_DEADLINE (1800s), the tasks' dispatch deadline: set TASK_DEADLINE=600s instead", 1},
		{"dispatch deadline above 30 min", "all.sh", nil, with("TASK_DEADLINE", "3600s"), "TASK_DEADLINE must be between 15s and 1800s", 1},
		{"dispatch deadline below 15 s", "all.sh", nil, with("TASK_DEADLINE", "10s"), "TASK_DEADLINE must be between 15s and 1800s", 1},
		{"below 1 vCPU", "all.sh", nil, with("CPU", "0.5"), "CPU=0.5: want 1, 2, 4, 6 or 8 vCPUs", 1},
		{"memory below 512Mi", "all.sh", nil, with("MEMORY", "256Mi"), "MEMORY=256Mi: want at least 512Mi", 1},
		{"memory for 4 vCPUs", "all.sh", nil, with("CPU", "4", "MEMORY", "1Gi"), "4 vCPUs need at least 2Gi", 1},
		{"concurrency", "all.sh", nil, with("CONCURRENCY", "0"), "CONCURRENCY=0: want 1 to 1000", 1},
		{"billing", "all.sh", nil, with("BILLING", "always"), "BILLING=always: want request", 1},
		{"min instances", "all.sh", nil, with("WORKER_MIN_INSTANCES", "-1"), "WORKER_MIN_INSTANCES=-1", 1},
		{"min instances above the cap", "all.sh", nil, with("WORKER_MIN_INSTANCES", "3", "MAX_INSTANCES", "2"), "WORKER_MIN_INSTANCES (3) exceeds MAX_INSTANCES (2)", 1},
		{"ingress name of the other command", "all.sh", nil, with("TARGET_INGRESS", "internal-only"), "TARGET_INGRESS=internal-only: want internal, all or internal-and-cloud-load-balancing", 1},
		{"Valkey password as a plain variable", "all.sh", nil, with("VALKEY_ADDR", "10.0.0.5:6379", "VALKEY_PASSWORD", "hunter2"), "put the password in Secret Manager and set VALKEY_PASSWORD_SECRET", 1},
		{"Valkey password in the address", "all.sh", nil, with("VALKEY_ADDR", "redis://default:hunter2@10.0.0.5:6379"), "VALKEY_ADDR must not carry a password", 1},
		{"Valkey IAM auth and a password", "all.sh", nil, with("VALKEY_ADDR", "10.0.0.5:6379", "VALKEY_IAM_AUTH", "true", "VALKEY_PASSWORD_SECRET", "valkey-auth"), "IAM authentication takes no password", 1},
		{"Valkey CA without TLS", "all.sh", nil, with("VALKEY_ADDR", "10.0.0.5:6379", "VALKEY_TLS_CA_SECRET", "valkey-ca"), "VALKEY_TLS_CA_SECRET is set but TLS is not on", 1},
		{"Valkey setting without an address", "all.sh", nil, with("VALKEY_CLUSTER", "true"), "VALKEY_CLUSTER is set but VALKEY_ADDR is not", 1},
		{"Valkey boolean", "all.sh", nil, with("VALKEY_ADDR", "10.0.0.5:6379", "VALKEY_TLS", "yes"), "VALKEY_TLS=yes: want true or false", 1},
		{"Valkey secret version", "all.sh", nil, with("VALKEY_ADDR", "10.0.0.5:6379", "VALKEY_PASSWORD_SECRET", "auth:v2"), "VALKEY_PASSWORD_SECRET=auth:v2: want SECRET or SECRET:VERSION", 1},
		{"deploy command", "05-functions.sh", nil, with("DEPLOY_WITH", "lambda"), "DEPLOY_WITH=lambda: want functions or run", 1},
		{"function name", "05-functions.sh", nil, with("WORKER_FUNCTION", "shop_worker"), "WORKER_FUNCTION=shop_worker: not a function name", 1},
		{"extra function name", "05-functions.sh", nil, with("EXTRA_FUNCTIONS", "Checkout 2fa"), "EXTRA_FUNCTIONS: '2fa' is not a function name", 1},
		{"extra function timeout", "05-functions.sh", nil, with("EXTRA_FUNCTIONS", "Checkout:2h"), "timeout of Checkout must be between", 1},
		{"two functions, one service", "05-functions.sh", nil, with("EXTRA_FUNCTIONS", "worker"), "share the Cloud Run service 'worker'", 1},
		{"Enqueue invokers without Enqueue", "06-invokers.sh", nil, with("ENQUEUE_FUNCTION", "none", "ENQUEUE_INVOKERS", "group:ops@example.com"), "ENQUEUE_FUNCTION=none deploys no Enqueue function", 1},
		{"extra invokers without extras", "06-invokers.sh", nil, with("EXTRA_INVOKERS", "group:ops@example.com"), "EXTRA_FUNCTIONS is empty", 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stdout, stderr, err := runScript(t, tt.script, tt.args, tt.env)
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != tt.exit {
				t.Fatalf("%s: err %v, want exit status %d; stderr:\n%s", tt.script, err, tt.exit, stderr)
			}
			if !strings.Contains(stderr, tt.stderr) {
				t.Errorf("stderr %q does not say %q", stderr, tt.stderr)
			}
			if stdout != "" {
				t.Errorf("printed commands before refusing the configuration:\n%s", stdout)
			}
		})
	}
}

// TestDryRunFailsWhereTheDeployWould checks that a module the real deploy
// could not build or start stops the dry run, before any step: a local
// replace whose code is not uploaded (no vendor/), and a function name the
// module's root package does not register.
func TestDryRunFailsWhereTheDeployWould(t *testing.T) {
	shop := map[string]string{
		"DRY_RUN": "1", "PROJECT": fakeProject, "WORKER_FUNCTION": "ShopWorker",
		"CLEANUP_FUNCTION": "ShopCleanupLocks", "ENQUEUE_FUNCTION": "none", "EXTRA_FUNCTIONS": "Checkout",
	}
	with := func(kv ...string) map[string]string {
		m := maps.Clone(shop)
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	stale := vendoredShop(t)
	if err := os.WriteFile(filepath.Join(stale, "vendor", "modules.txt"), []byte("# golang.org/x/sync v0.10.0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, stderr string
		env          map[string]string
	}{
		{"a local replace without vendor/", "replaces a module with the local directory ../.., which is not uploaded: run 'go mod vendor' in " + shopDir(t) + " first",
			with("SOURCE_DIR", shopDir(t))},
		{"vendor/ without the replacement", "vendor/modules.txt does not record the replacement by ../..", with("SOURCE_DIR", stale)},
		{"a Worker the module does not register", "does not register a function named ShopWorkr", with("SOURCE_DIR", vendoredShop(t), "WORKER_FUNCTION", "ShopWorkr")},
		{"an extra function the module does not register", "does not register a function named Refunds", with("SOURCE_DIR", vendoredShop(t), "EXTRA_FUNCTIONS", "Checkout Refunds")},
		{"taskguard's names in a module that registers others", "does not register a function named Worker", with("SOURCE_DIR", vendoredShop(t), "WORKER_FUNCTION", "Worker")},
		{"no module", "has no go.mod", with("SOURCE_DIR", t.TempDir())},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stdout, stderr, err := runScript(t, "all.sh", nil, tt.env)
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != 1 {
				t.Fatalf("err %v, want exit status 1; stderr:\n%s", err, stderr)
			}
			if !strings.Contains(stderr, tt.stderr) {
				t.Errorf("stderr %q does not say %q", stderr, tt.stderr)
			}
			if stdout != "" {
				t.Errorf("printed commands before refusing the module:\n%s", stdout)
			}
		})
	}
	// The same module passes once vendored, and with the names it registers.
	dryRun(t, "all.sh", nil, with("SOURCE_DIR", vendoredShop(t)))
}

// TestDryRunAcceptsAModuleVendoredByGo runs the real `go mod vendor` (offline,
// from the module cache) on a copy of the example module whose replace
// points at this checkout, and checks that the dry run accepts the result:
// the check reads vendor/modules.txt as Go writes it.
func TestDryRunAcceptsAModuleVendoredByGo(t *testing.T) {
	dir := t.TempDir()
	files, err := filepath.Glob(filepath.Join(shopDir(t), "*"))
	if err != nil {
		t.Fatal(err)
	}
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		name := filepath.Base(f)
		if name != "go.mod" && name != "go.sum" && !strings.HasSuffix(name, ".go") {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if name == "go.mod" {
			b = regexp.MustCompile(`(?m)^(replace github\.com/taskguard/taskguard =>) \S+$`).ReplaceAll(b, []byte("$1 "+root))
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	env := map[string]string{
		"DRY_RUN": "1", "PROJECT": fakeProject, "SOURCE_DIR": dir, "WORKER_FUNCTION": "ShopWorker",
		"CLEANUP_FUNCTION": "ShopCleanupLocks", "ENQUEUE_FUNCTION": "none", "EXTRA_FUNCTIONS": "Checkout",
	}
	if _, stderr, err := runScript(t, "all.sh", nil, env); err == nil || !strings.Contains(stderr, "run 'go mod vendor'") {
		t.Fatalf("before vendoring: err %v, stderr %q; want the dry run to ask for go mod vendor", err, stderr)
	}
	vendor := exec.CommandContext(t.Context(), "go", "mod", "vendor")
	vendor.Dir = dir
	vendor.Env = append(os.Environ(), "GOFLAGS=-mod=mod", "GOPROXY=off", "GOWORK=off")
	if out, err := vendor.CombinedOutput(); err != nil {
		t.Fatalf("go mod vendor (offline, from the module cache): %v\n%s", err, out)
	}
	cmds := dryRun(t, "all.sh", nil, env)
	i := slices.IndexFunc(cmds, func(c command) bool { return c.is("functions", "deploy") && c.arg(2, 0) == "ShopWorker" })
	if i < 0 {
		t.Fatal("the vendored module's Worker is not deployed")
	}
	if src, _ := cmds[i].flag("source"); src != dir {
		t.Errorf("--source=%q, want the vendored module %q", src, dir)
	}
}

// TestBothDeployPathsGiveOneProfile deploys the same configurations with
// gcloud functions deploy and with gcloud run deploy, and checks that every
// function gets the same CPU, memory, concurrency, billing, instances,
// ingress, authentication, account, secrets, environment and timeout either
// way; and that the profile is the documented one: the Worker with at least
// 1 vCPU and a concurrency above 1, billing and minimum instances explicit.
func TestBothDeployPathsGiveOneProfile(t *testing.T) {
	configs := map[string]map[string]string{
		"defaults": {"DRY_RUN": "1", "PROJECT": fakeProject},
		"instance billing, warm Worker": {"DRY_RUN": "1", "PROJECT": fakeProject, "BILLING": "instance", "WORKER_MIN_INSTANCES": "1",
			"CPU": "2", "MEMORY": "2Gi", "CONCURRENCY": "250", "TARGET_INGRESS": "all", "TASK_DEADLINE": "10m"},
		"a module of its own": moduleEnv(t, ""),
	}
	for name, env := range configs {
		t.Run(name, func(t *testing.T) {
			byPath := map[string]plan{}
			for _, with := range []string{"functions", "run"} {
				env := maps.Clone(env)
				env["DEPLOY_WITH"] = with
				byPath[with] = checkPlan(t, scenario{name: name + ", " + with, env: env}, dryRun(t, "all.sh", nil, env))
			}
			f, r := byPath["functions"].settings, byPath["run"].settings
			if len(f) == 0 || len(f) != len(r) {
				t.Fatalf("functions deploy gives %d functions, run deploy %d", len(f), len(r))
			}
			for fn, fs := range f {
				rs, ok := r[fn]
				if !ok {
					t.Errorf("%s: deployed by functions deploy only", fn)
					continue
				}
				if !maps.Equal(fs.env, rs.env) {
					t.Errorf("%s: environment differs:\n functions %v\n      run %v", fn, fs.env, rs.env)
				}
				fs.env, rs.env = nil, nil
				if !reflect.DeepEqual(fs, rs) {
					t.Errorf("%s: the deploy paths differ:\n functions %+v\n      run %+v", fn, fs, rs)
				}
				if fs.billing == "" || fs.minInstances == "" || fs.ingress == "" || fs.concurrency == "" || fs.cpu == "" {
					t.Errorf("%s: left to the platform's default: %+v", fn, fs)
				}
			}
			e := expect(scenario{env: env})
			w := f[e.worker]
			if cpu, _ := strconv.Atoi(w.cpu); cpu < 1 {
				t.Errorf("Worker: %s vCPU, want at least 1", w.cpu)
			}
			if c, _ := strconv.Atoi(w.concurrency); c < 2 {
				t.Errorf("Worker: concurrency %s, want several requests per instance", w.concurrency)
			}
		})
	}
}

// TestScriptsWarnAboutRiskyTimings checks the warnings for settings that are
// allowed but weaken the guarantees the README describes.
func TestScriptsWarnAboutRiskyTimings(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		want string // "" means no warning
	}{
		{"defaults", nil, ""},
		{"a shorter deadline, the Worker's timeout following it", map[string]string{"TASK_DEADLINE": "300s"}, ""},
		{"one request per instance", map[string]string{"CONCURRENCY": "1"}, "CONCURRENCY=1: every delivery gets an instance of its own"},
		{"lease longer than the dispatch deadline", map[string]string{"TASKGUARD_LEASE": "1h"}, "TASKGUARD_LEASE (1h) >= TASK_DEADLINE"},
		{"backoff shorter than the lease", map[string]string{"TASKGUARD_LEASE": "10m", "QUEUE_MAX_BACKOFF": "60s"}, "QUEUE_MAX_BACKOFF (60s) < TASKGUARD_LEASE"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := map[string]string{"DRY_RUN": "1", "PROJECT": fakeProject}
			for k, v := range tt.env {
				env[k] = v
			}
			_, stderr, err := runScript(t, "05-functions.sh", nil, env)
			if err != nil {
				t.Fatalf("%v\n%s", err, stderr)
			}
			warned := strings.Contains(stderr, "warning:")
			if tt.want == "" && warned || tt.want != "" && !strings.Contains(stderr, tt.want) {
				t.Errorf("stderr %q, want warning %q", stderr, tt.want)
			}
		})
	}
}

// ---- the gcloud CLI, offline ------------------------------------------------

// gcloudPath finds the gcloud CLI. Without it the offline check is skipped
// locally and fails in CI.
func gcloudPath(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("gcloud")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("gcloud CLI not found (required when CI=true): %v", err)
		}
		t.Skipf("gcloud CLI not found; skipping the offline check of deploy commands: %v", err)
	}
	return p
}

// tripwire is a TCP listener posing as gcloud's HTTP(S) proxy: any connection
// means gcloud tried to reach the network, which the check must never do.
type tripwire struct {
	ln   net.Listener
	hits atomic.Int64
	wg   sync.WaitGroup
}

func newTripwire(t *testing.T) *tripwire {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tw := &tripwire{ln: ln}
	tw.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			tw.hits.Add(1)
			c.Close()
		}
	})
	t.Cleanup(func() {
		ln.Close()
		tw.wg.Wait()
	})
	return tw
}

// result is how gcloud answered one command.
type result struct {
	exit   int
	stderr string
	err    error // the command could not run or was killed
}

var (
	// argumentError is how gcloud reports arguments it cannot parse.
	argumentError = regexp.MustCompile(`(?i)unrecognized arguments|invalid value|invalid choice|bad syntax|argument --[a-z0-9-]+:|must be specified|is required|usage: gcloud`)
	// parsedOK is where gcloud stops once the arguments parsed: credentials.
	parsedOK = "You do not currently have an active account selected"
)

// verdict says whether gcloud accepted the command's arguments.
func (r result) verdict() (accepted bool, why string) {
	switch {
	case r.err != nil:
		return false, r.err.Error()
	case r.exit == 2 || argumentError.MatchString(r.stderr):
		return false, fmt.Sprintf("arguments rejected (exit %d): %s", r.exit, strings.TrimSpace(r.stderr))
	case r.exit == 1 && strings.Contains(r.stderr, parsedOK):
		return true, ""
	default:
		return false, fmt.Sprintf("unexpected outcome (exit %d; want exit 1 at the credentials check): %s", r.exit, strings.TrimSpace(r.stderr))
	}
}

// runGcloud runs the commands through gcloud, two at a time, each with its own
// empty configuration directory, no credentials, a fake project and a proxy
// that is a tripwire.
func runGcloud(t *testing.T, gcloud string, cmds []command) []result {
	t.Helper()
	tw := newTripwire(t)
	port := strconv.Itoa(tw.ln.Addr().(*net.TCPAddr).Port)
	proxy := "http://127.0.0.1:" + port
	configs := make([]string, len(cmds))
	for i := range cmds {
		configs[i] = t.TempDir()
	}
	// gcloud takes 1-4 s per call on a quiet machine and several times that
	// on a loaded one; the budget only stops a gcloud that hangs.
	ctx, cancel := context.WithTimeout(t.Context(), max(3*time.Minute, time.Duration(len(cmds))*15*time.Second))
	defer cancel()
	results := make([]result, len(cmds))
	var g errgroup.Group
	g.SetLimit(2)
	for i, c := range cmds {
		g.Go(func() error {
			cmd := exec.CommandContext(ctx, gcloud, c[1:]...)
			cmd.Env = []string{
				"PATH=" + os.Getenv("PATH"),
				"HOME=" + configs[i],
				"LC_ALL=C.UTF-8",
				"CLOUDSDK_CONFIG=" + configs[i],
				"CLOUDSDK_CORE_PROJECT=" + fakeProject,
				"CLOUDSDK_CORE_DISABLE_PROMPTS=1",
				"CLOUDSDK_CORE_DISABLE_USAGE_REPORTING=true",
				"CLOUDSDK_CORE_CHECK_GCE_METADATA=false",
				"CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK=true",
				"CLOUDSDK_PROXY_TYPE=http",
				"CLOUDSDK_PROXY_ADDRESS=127.0.0.1",
				"CLOUDSDK_PROXY_PORT=" + port,
				"HTTPS_PROXY=" + proxy,
				"HTTP_PROXY=" + proxy,
			}
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			r := result{stderr: stderr.String()}
			var exit *exec.ExitError
			switch {
			case err == nil:
				r.err = errors.New("gcloud succeeded without credentials; it must not")
			case errors.As(err, &exit) && ctx.Err() == nil:
				r.exit = exit.ExitCode()
			default:
				r.err = fmt.Errorf("running gcloud: %w (context: %v)", err, ctx.Err())
			}
			results[i] = r
			return nil
		})
	}
	_ = g.Wait() // the goroutines report through results, never an error
	if n := tw.hits.Load(); n != 0 {
		t.Errorf("gcloud opened %d network connection(s) through the tripwire proxy; the check must stay offline", n)
	}
	return results
}

// uniqueShapes keeps the first command of each shape, in order.
func uniqueShapes(cmds []command) []command {
	seen := map[string]bool{}
	var out []command
	for _, c := range cmds {
		if k := c.shape(); !seen[k] {
			seen[k] = true
			out = append(out, c)
		}
	}
	return out
}

// mutation turns a command the scripts print into one gcloud must reject.
type mutation struct {
	name   string
	target func(command) bool
	change func(command) command
	stderr string // what gcloud's complaint must contain
}

func replaceFlag(name, value string) func(command) command {
	return func(c command) command {
		out := slices.Clone(c)
		for i, a := range out {
			if a == "--"+name || strings.HasPrefix(a, "--"+name+"=") {
				out[i] = "--" + name + "=" + value
			}
		}
		return out
	}
}

func renameFlag(from, to string) func(command) command {
	return func(c command) command {
		out := slices.Clone(c)
		for i, a := range out {
			if v, ok := strings.CutPrefix(a, "--"+from+"="); ok {
				out[i] = "--" + to + "=" + v
			}
		}
		return out
	}
}

func isCmd(path ...string) func(command) bool {
	return func(c command) bool { return c.is(path...) }
}

var mutations = []mutation{
	{
		name:   "unknown flag on run deploy",
		target: isCmd("run", "deploy"),
		change: func(c command) command { return append(slices.Clone(c), "--entry-point=Worker") },
		stderr: "unrecognized arguments: --entry-point",
	},
	{
		name:   "unknown flag on functions deploy",
		target: isCmd("functions", "deploy"),
		change: func(c command) command { return append(slices.Clone(c), "--no-such-flag") },
		stderr: "unrecognized arguments: --no-such-flag",
	},
	{
		name:   "misspelt queue flag",
		target: isCmd("tasks", "queues", "create"),
		change: renameFlag("max-dispatches-per-second", "max-dispatch-per-second"),
		stderr: "unrecognized arguments",
	},
	{
		name:   "functions deploy timeout that is not a duration",
		target: isCmd("functions", "deploy"),
		change: replaceFlag("timeout", "thirty"),
		stderr: "argument --timeout",
	},
	{
		name:   "environment variable without a value",
		target: isCmd("functions", "deploy"),
		change: replaceFlag("set-env-vars", "TASKGUARD_LEASE"),
		stderr: "argument --set-env-vars",
	},
	{
		name: "VPC egress setting",
		target: func(c command) bool {
			_, vpc := c.flag("vpc-egress")
			return c.is("run", "services", "update") && vpc
		},
		change: replaceFlag("vpc-egress", "private-only"),
		stderr: "Invalid choice",
	},
	{
		name:   "run deploy's ingress name on functions deploy",
		target: isCmd("functions", "deploy"),
		change: replaceFlag("ingress-settings", "internal"),
		stderr: "Invalid choice",
	},
	{
		name:   "functions deploy's ingress name on run deploy",
		target: isCmd("run", "deploy"),
		change: replaceFlag("ingress", "internal-only"),
		stderr: "argument --ingress",
	},
	{
		name:   "billing flag on functions deploy (not in gcloud 528)",
		target: isCmd("functions", "deploy"),
		change: func(c command) command { return append(slices.Clone(c), "--no-cpu-throttling") },
		stderr: "unrecognized arguments",
	},
	{
		name:   "Direct VPC flags on functions deploy (not in gcloud 528)",
		target: isCmd("functions", "deploy"),
		change: func(c command) command {
			return append(slices.Clone(c), "--network=default", "--subnet=default", "--direct-vpc-egress=private-ranges-only")
		},
		stderr: "unrecognized arguments",
	},
}

// TestGcloudAcceptsEveryCommand passes every distinct command the scripts
// print, in every scenario, through the real gcloud CLI offline; and proves the
// check can fail by passing deliberately broken variants that gcloud must reject.
func TestGcloudAcceptsEveryCommand(t *testing.T) {
	gcloud := gcloudPath(t)
	start := time.Now()

	var all []command
	for _, s := range scenarios(t) {
		all = append(all, dryRun(t, "all.sh", s.args, s.env)...)
	}
	cmds := uniqueShapes(all)

	var broken []command
	for _, m := range mutations {
		i := slices.IndexFunc(cmds, m.target)
		if i < 0 {
			t.Fatalf("mutation %q: the scripts print no command it applies to", m.name)
		}
		b := m.change(cmds[i])
		if slices.Equal(b, cmds[i]) {
			t.Fatalf("mutation %q changed nothing in %s", m.name, cmds[i])
		}
		broken = append(broken, b)
	}

	results := runGcloud(t, gcloud, append(slices.Clone(cmds), broken...))
	t.Logf("gcloud checked %d distinct commands (of %d printed) and %d broken variants in %v",
		len(cmds), len(all), len(broken), time.Since(start).Round(100*time.Millisecond))

	for i, c := range cmds {
		t.Run("accepts/"+strings.Join(c.words()[1:], " "), func(t *testing.T) {
			if ok, why := results[i].verdict(); !ok {
				t.Errorf("gcloud %s\n%s", strings.Join(c[1:], " "), why)
			}
		})
	}
	for i, m := range mutations {
		r := results[len(cmds)+i]
		t.Run("rejects/"+m.name, func(t *testing.T) {
			ok, why := r.verdict()
			if ok {
				t.Fatalf("gcloud accepted a broken command: %s", broken[i])
			}
			if r.exit != 2 || !strings.Contains(r.stderr, m.stderr) {
				t.Errorf("want an argument error (exit 2) mentioning %q; got: %s", m.stderr, why)
			}
		})
	}
}
