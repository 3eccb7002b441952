package app

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestConfigFromEnv(t *testing.T) {
	valid := map[string]string{
		EnvProject:            "my-project",
		EnvLease:              "45s",
		EnvCleanupGrace:       "20m",
		EnvQueue:              "projects/my-project/locations/europe-west1/queues/jobs",
		EnvWorkerURL:          "https://worker-123.europe-west1.run.app",
		EnvTaskServiceAccount: "tasks@my-project.iam.gserviceaccount.com",
		EnvMemcache:           "10.0.0.3:11211, 10.0.0.4:11211",
		EnvValkey:             "10.0.0.5:6379",
		EnvBusy:               "429",
		EnvTaskDeadline:       "300s",
	}
	cfg, err := ConfigFromEnv(env(valid))
	if err != nil {
		t.Fatalf("valid configuration refused: %v", err)
	}
	if cfg.Lease != 45*time.Second || cfg.CleanupGrace != 20*time.Minute || !cfg.EnqueueEnabled() || cfg.Busy != Busy429 || cfg.DatastoreProject != "my-project" || cfg.TaskDeadline != 5*time.Minute {
		t.Errorf("config = %+v", cfg)
	}
	if cfg, err := ConfigFromEnv(env(nil)); err != nil || cfg.EnqueueEnabled() {
		t.Errorf("empty environment: %+v, %v; want a valid config with Enqueue disabled", cfg, err)
	}

	bad := map[string]string{
		EnvLease:              "-5s",
		EnvCleanupGrace:       "soon",
		EnvQueue:              "jobs",
		EnvWorkerURL:          "http://worker.example.com",
		EnvTaskServiceAccount: "nobody",
		EnvDatastoreEmulator:  "localhost",
		EnvBusy:               "wait",
		EnvLogLevel:           "verbose",
		EnvTaskDeadline:       "1h",
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

// TestConfigRefusesStoreNames checks that names Datastore would refuse are
// refused at start, all of them in the one error.
func TestConfigRefusesStoreNames(t *testing.T) {
	cases := []struct {
		name, env, value string
	}{
		{"reserved namespace", EnvDatastoreNamespace, "__x__"},
		{"namespace with a slash", EnvDatastoreNamespace, "tenant/a"},
		{"namespace with NUL", EnvDatastoreNamespace, "a\x00b"},
		{"kind over 1500 bytes", EnvDatastoreKind, strings.Repeat("k", 1501)},
		{"kind with NUL", EnvDatastoreKind, "Lock\x00"},
		{"reserved kind", EnvDatastoreKind, "__Lock__"},
		{"database id with capitals", EnvDatastoreDatabase, "MyDatabase"},
		{"database id too short", EnvDatastoreDatabase, "abc"},
		{"database id ending in a hyphen", EnvDatastoreDatabase, "locks-"},
		{"database id shaped like a UUID", EnvDatastoreDatabase, "a0000000-0000-0000-0000-000000000000"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ConfigFromEnv(env(map[string]string{EnvProject: "p", tc.env: tc.value}))
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.env+"=") {
				t.Errorf("%s=%.50q: err = %v; want ErrConfig naming %s", tc.env, tc.value, err, tc.env)
			}
		})
	}
	all := map[string]string{EnvProject: "p", EnvDatastoreNamespace: "__x__", EnvDatastoreKind: "a\x00", EnvDatastoreDatabase: "X"}
	_, err := ConfigFromEnv(env(all))
	if n := strings.Count(fmt.Sprint(err), "\n"); n != 3 {
		t.Errorf("three bad names: %d problem lines; want 3:\n%v", n, err)
	}
	for _, ok := range []map[string]string{
		{EnvDatastoreNamespace: "tenant-a.b_c", EnvDatastoreKind: "TaskguardLock", EnvDatastoreDatabase: "locks-db1"},
		{EnvDatastoreDatabase: "(default)", EnvDatastoreKind: "Lock_ü"},
	} {
		if _, err := ConfigFromEnv(env(ok)); err != nil {
			t.Errorf("valid names %q refused: %v", ok, err)
		}
	}
}
