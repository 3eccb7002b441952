package deploy_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// buildConfig is the part of Cloud Build's schema cloudbuild.yaml may use.
// Decoding is strict, so a misspelt field (entryPoint, waitfor) fails the test.
type buildConfig struct {
	Steps          []buildStep       `yaml:"steps"`
	Substitutions  map[string]string `yaml:"substitutions"`
	Options        buildOptions      `yaml:"options"`
	Timeout        string            `yaml:"timeout"`
	ServiceAccount string            `yaml:"serviceAccount"`
	Tags           []string          `yaml:"tags"`
}

type buildOptions struct {
	Env                []string `yaml:"env"`
	Logging            string   `yaml:"logging"`
	MachineType        string   `yaml:"machineType"`
	SubstitutionOption string   `yaml:"substitutionOption"`
}

type buildStep struct {
	ID         string   `yaml:"id"`
	Name       string   `yaml:"name"`
	Entrypoint string   `yaml:"entrypoint"`
	Args       []string `yaml:"args"`
	Env        []string `yaml:"env"`
	Dir        string   `yaml:"dir"`
	WaitFor    []string `yaml:"waitFor"`
	Timeout    string   `yaml:"timeout"`
}

// builtinSubstitutions are the ones Cloud Build provides itself.
var builtinSubstitutions = []string{
	"PROJECT_ID", "PROJECT_NUMBER", "BUILD_ID", "LOCATION", "TRIGGER_NAME", "COMMIT_SHA",
	"REVISION_ID", "SHORT_SHA", "REPO_NAME", "REPO_FULL_NAME", "BRANCH_NAME", "TAG_NAME",
	"REF_NAME", "TRIGGER_BUILD_CONFIG_PATH", "SERVICE_ACCOUNT_EMAIL", "SERVICE_ACCOUNT",
}

// substitution matches what Cloud Build substitutes: $NAME, ${NAME}, and $$ (a literal $).
var substitution = regexp.MustCompile(`\$(\$|\{[A-Za-z0-9_]+\}|[A-Za-z_][A-Za-z0-9_]*)`)

func loadBuild(t *testing.T) buildConfig {
	t.Helper()
	src, err := os.ReadFile(filepath.Join("..", "cloudbuild.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(src))
	dec.KnownFields(true)
	var b buildConfig
	if err := dec.Decode(&b); err != nil {
		t.Fatalf("cloudbuild.yaml: %v", err)
	}
	if len(b.Steps) == 0 {
		t.Fatal("cloudbuild.yaml has no steps")
	}
	return b
}

// substituted returns every string Cloud Build applies substitutions to.
func (b buildConfig) substituted() []string {
	out := slices.Clone(b.Options.Env)
	for _, s := range b.Steps {
		out = append(out, s.Name, s.Entrypoint, s.Dir)
		out = append(out, s.Args...)
		out = append(out, s.Env...)
	}
	return out
}

// expand applies the substitutions' default values as Cloud Build would,
// with PROJECT_ID set to the fake project.
func (b buildConfig) expand(s string) string {
	return substitution.ReplaceAllStringFunc(s, func(m string) string {
		name := strings.Trim(m[1:], "{}")
		switch {
		case name == "$":
			return "$"
		case name == "PROJECT_ID":
			return fakeProject
		default:
			return b.Substitutions[name]
		}
	})
}

// envMap turns KEY=VALUE entries into a map, expanded.
func (b buildConfig) envMap(t *testing.T, entries []string) map[string]string {
	t.Helper()
	m := map[string]string{}
	for _, kv := range entries {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			t.Errorf("cloudbuild.yaml env entry %q is not KEY=VALUE", kv)
			continue
		}
		m[k] = b.expand(v)
	}
	return m
}

// deploySteps returns the steps that run a deploy/ script, with the script name.
func (b buildConfig) deploySteps() (idx []int, scripts []string) {
	for i, s := range b.Steps {
		for _, a := range s.Args {
			if name, ok := strings.CutPrefix(a, "deploy/"); ok && strings.HasSuffix(name, ".sh") {
				idx = append(idx, i)
				scripts = append(scripts, name)
			}
		}
	}
	return idx, scripts
}

// cloudBuildScenario is the configuration cloudbuild.yaml gives the deploy
// steps, with its substitutions' defaults.
func cloudBuildScenario(t *testing.T) scenario {
	t.Helper()
	b := loadBuild(t)
	env := b.envMap(t, b.Options.Env)
	idx, _ := b.deploySteps()
	for _, i := range idx {
		for k, v := range b.envMap(t, b.Steps[i].Env) {
			env[k] = v
		}
	}
	env["DRY_RUN"] = "1"
	return scenario{name: "cloudbuild.yaml deploy steps", env: env}
}

// TestCloudBuild checks cloudbuild.yaml: it parses, its substitutions are
// declared and used, it tests before it deploys, and it deploys through the
// deploy/ scripts (whose commands the other tests check) with configuration
// they understand.
func TestCloudBuild(t *testing.T) {
	b := loadBuild(t)

	t.Run("substitutions", func(t *testing.T) {
		used := map[string]bool{}
		for _, s := range b.substituted() {
			for _, m := range substitution.FindAllString(s, -1) {
				name := strings.Trim(m[1:], "{}")
				if name == "$" {
					continue
				}
				used[name] = true
				_, declared := b.Substitutions[name]
				if !declared && !slices.Contains(builtinSubstitutions, name) {
					t.Errorf("$%s is neither a built-in nor a declared substitution (write $$%s for a shell variable)", name, name)
				}
			}
		}
		for name := range b.Substitutions {
			if !strings.HasPrefix(name, "_") {
				t.Errorf("user substitution %s must start with _", name)
			}
			if !used[name] {
				t.Errorf("substitution %s is declared but never used (Cloud Build rejects that)", name)
			}
		}
		for _, name := range []string{"_REGION", "_QUEUE", "_WORKER_SA", "_ENQUEUE_SA", "_CLEANUP_SA", "_TASKS_SA", "_SCHEDULER_SA"} {
			if b.Substitutions[name] == "" {
				t.Errorf("substitution %s needs a default", name)
			}
		}
	})

	t.Run("tests before deploying", func(t *testing.T) {
		test := b.Steps[0]
		script := strings.Join(test.Args, "\n")
		for _, want := range []string{"set -euo pipefail", "\n.ci/run\n"} {
			if !strings.Contains(script, want) {
				t.Errorf("first step does not run %q", want)
			}
		}
		// .ci/run is the README's test command; it must still vet and run the suite.
		ci, err := os.ReadFile(filepath.Join("..", ".ci", "run"))
		if err != nil {
			t.Fatalf("the test step runs .ci/run: %v", err)
		}
		makefile, err := os.ReadFile(filepath.Join("..", "Makefile"))
		if err != nil {
			t.Fatalf(".ci/run runs make: %v", err)
		}
		if !strings.Contains(string(ci), "make test") {
			t.Error(".ci/run no longer runs `make test`; update cloudbuild.yaml's test step")
		}
		for _, want := range []string{"go vet ./...", "go test $(GOTEST_FLAGS) ./...", "-race"} {
			if !strings.Contains(string(makefile), want) {
				t.Errorf("Makefile no longer has %q; check what cloudbuild.yaml's test step runs", want)
			}
		}
		if !slices.Contains(test.Env, "CI=true") {
			t.Error("the test step must set CI=true so that a missing emulator fails the build")
		}
		for _, pkg := range []string{"google-cloud-cli-datastore-emulator", "google-cloud-cli-firestore-emulator", "openjdk-17-jre-headless", "memcached", "redis-server"} {
			if !strings.Contains(script, pkg) {
				t.Errorf("the test step does not install %s", pkg)
			}
		}
		goVersion := goModVersion(t)
		if !strings.HasPrefix(test.Name, "golang:"+goVersion+"-") {
			t.Errorf("test image %s is not the Go of go.mod (%s)", test.Name, goVersion)
		}
		// The deploy configuration in options.env reaches the test step too;
		// it must not point the tests at services.
		for k := range b.envMap(t, b.Options.Env) {
			if strings.HasPrefix(k, "TASKGUARD_") || k == "MEMCACHE_SERVERS" || k == "VALKEY_ADDR" || k == "GOOGLE_CLOUD_PROJECT" {
				if !regexp.MustCompile(`(?m)^\s*unset .*\b` + k + `\b`).MatchString(script) {
					t.Errorf("the test step does not unset %s, which the tests could read", k)
				}
			}
		}
	})

	t.Run("deploys through the scripts in order", func(t *testing.T) {
		idx, scripts := b.deploySteps()
		if !slices.Equal(scripts, steps) {
			t.Fatalf("deploy steps run %v, want %v (the order of all.sh)", scripts, steps)
		}
		for n, i := range idx {
			s := b.Steps[i]
			if i == 0 {
				t.Errorf("deploy step %s runs before the tests", s.ID)
			}
			if s.Entrypoint != "bash" || !slices.Equal(s.Args, []string{"deploy/" + steps[n]}) {
				t.Errorf("step %s: want entrypoint bash with args [deploy/%s], got %s %v", s.ID, steps[n], s.Entrypoint, s.Args)
			}
			if len(s.WaitFor) != 0 {
				t.Errorf("step %s has waitFor %v; deploy steps must run one after another after the tests", s.ID, s.WaitFor)
			}
			if s.Name != "$_GCLOUD_IMAGE" {
				t.Errorf("step %s runs in %s, want $_GCLOUD_IMAGE", s.ID, s.Name)
			}
		}
		if len(b.Steps) != 1+len(idx) {
			t.Errorf("cloudbuild.yaml has %d steps, want the test step and %d deploy steps", len(b.Steps), len(idx))
		}
	})

	t.Run("no gcloud outside the scripts", func(t *testing.T) {
		for _, s := range b.Steps {
			for _, a := range s.Args {
				if strings.Contains(a, "gcloud ") {
					t.Errorf("step %s runs gcloud directly; deploy commands belong in deploy/ where the tests check them", s.ID)
				}
			}
		}
	})

	t.Run("configuration the scripts read", func(t *testing.T) {
		known := configNames(t)
		check := func(where string, entries []string, extra ...string) {
			for _, kv := range entries {
				k, _, _ := strings.Cut(kv, "=")
				if !slices.Contains(known, k) && !slices.Contains(extra, k) {
					t.Errorf("%s sets %s, which deploy/lib.sh does not read", where, k)
				}
			}
		}
		check("options.env", b.Options.Env)
		idx, _ := b.deploySteps()
		for _, i := range idx {
			check("step "+b.Steps[i].ID, b.Steps[i].Env)
		}
		env := b.envMap(t, b.Options.Env)
		if env["PROJECT"] != fakeProject {
			t.Errorf("PROJECT=%q; want the build's own project ($PROJECT_ID)", env["PROJECT"])
		}
	})

	t.Run("gcloud version validated against", func(t *testing.T) {
		local := localGcloudVersion(t)
		if local == "" {
			t.Skip("no local gcloud installation to compare with")
		}
		if want := local + "-0"; b.Substitutions["_GCLOUD_APT_VERSION"] != want {
			t.Errorf("_GCLOUD_APT_VERSION=%s; the scripts are validated against gcloud %s, so pin %s",
				b.Substitutions["_GCLOUD_APT_VERSION"], local, want)
		}
	})
}

// goModVersion reads the go directive of the module's go.mod.
func goModVersion(t *testing.T) string {
	t.Helper()
	src, err := os.ReadFile(filepath.Join("..", "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^go (\S+)$`).FindSubmatch(src)
	if m == nil {
		t.Fatal("go.mod has no go directive")
	}
	return string(m[1])
}

// localGcloudVersion reads the installed SDK's VERSION file next to the gcloud
// on PATH ("" when there is none), without running gcloud.
func localGcloudVersion(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("gcloud")
	if err != nil {
		return ""
	}
	real, err := filepath.EvalSymlinks(p)
	if err != nil {
		return ""
	}
	v, err := os.ReadFile(filepath.Join(filepath.Dir(real), "..", "VERSION"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(v))
}
