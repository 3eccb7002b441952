package taskguard

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestConfigFromEnv(t *testing.T) {
	valid := map[string]string{
		EnvProject:            "my-project",
		EnvDefaultKind:        "weak",
		EnvLease:              "45s",
		EnvCleanupGrace:       "20m",
		EnvQueue:              "projects/my-project/locations/europe-west1/queues/jobs",
		EnvWorkerURL:          "https://worker-123.europe-west1.run.app",
		EnvTaskServiceAccount: "tasks@my-project.iam.gserviceaccount.com",
		EnvMemcache:           "10.0.0.3:11211, 10.0.0.4:11211",
		EnvValkey:             "10.0.0.5:6379",
	}
	cfg, err := ConfigFromEnv(env(valid))
	if err != nil {
		t.Fatalf("valid configuration refused: %v", err)
	}
	if cfg.DefaultKind != locking.Weak || cfg.Lease != 45*time.Second || cfg.CleanupGrace != 20*time.Minute || !cfg.EnqueueEnabled() {
		t.Errorf("config = %+v", cfg)
	}
	if cfg, err := ConfigFromEnv(env(nil)); err != nil || cfg.EnqueueEnabled() || cfg.DefaultKind != locking.Strong {
		t.Errorf("empty environment: %+v, %v; want a valid config with Enqueue disabled", cfg, err)
	}

	bad := map[string]string{
		EnvDefaultKind:        "medium",
		EnvLease:              "-5s",
		EnvCleanupGrace:       "soon",
		EnvQueue:              "jobs",
		EnvWorkerURL:          "http://worker.example.com",
		EnvTaskServiceAccount: "nobody",
		EnvMemcache:           "10.0.0.3",
		EnvDatastoreEmulator:  "localhost",
		EnvTokenURL:           "ftp://x",
	}
	_, err = ConfigFromEnv(env(bad))
	if !errors.Is(err, ErrConfig) {
		t.Fatalf("bad configuration: err = %v; want ErrConfig", err)
	}
	for name := range bad {
		if !strings.Contains(err.Error(), name+"=") {
			t.Errorf("error does not name %s:\n%v", name, err)
		}
	}
	if n := strings.Count(err.Error(), "\n"); n != len(bad) {
		t.Errorf("error has %d problem lines; want one per variable (%d):\n%v", n, len(bad), err)
	}

	if _, err := ConfigFromEnv(env(map[string]string{"K_SERVICE": "worker"})); err == nil || !strings.Contains(err.Error(), EnvProject) {
		t.Errorf("on Cloud Run without a project: err = %v; want %s named (in-memory locks guard nothing across instances)", err, EnvProject)
	}
	if _, err := ConfigFromEnv(env(map[string]string{"K_SERVICE": "worker", EnvProject: "p"})); err != nil {
		t.Errorf("on Cloud Run with a project: %v", err)
	}

	partial := map[string]string{EnvQueue: "projects/p/locations/l/queues/q"}
	if _, err := ConfigFromEnv(env(partial)); err == nil || !strings.Contains(err.Error(), EnvWorkerURL) {
		t.Errorf("queue without worker URL: err = %v; want it named", err)
	}
	local := map[string]string{
		EnvQueue: "projects/p/locations/l/queues/q", EnvWorkerURL: "http://127.0.0.1:8080/Worker",
		EnvTaskServiceAccount: "w@p.iam.gserviceaccount.com", EnvTasksEmulator: "127.0.0.1:9000",
	}
	if _, err := ConfigFromEnv(env(local)); err != nil {
		t.Errorf("http worker URL with a tasks emulator refused: %v", err)
	}
}
