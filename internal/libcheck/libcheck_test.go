package libcheck

import (
	"fmt"
	"log"
	"log/slog"
	"net/http"
	"os/exec"
	"strings"
	"testing"

	"github.com/GoogleCloudPlatform/functions-framework-go/functions"

	// The libraries under test: their init functions have run before the
	// tests start.
	_ "github.com/taskguard/taskguard/app"
	_ "github.com/taskguard/taskguard/cloudlog"
	_ "github.com/taskguard/taskguard/locking"
	_ "github.com/taskguard/taskguard/locking/lockhttp"
	_ "github.com/taskguard/taskguard/tasks"
)

// libraries are the packages a project imports to use taskguard.
var libraries = []string{
	"github.com/taskguard/taskguard/locking",
	"github.com/taskguard/taskguard/locking/lockhttp",
	"github.com/taskguard/taskguard/tasks",
	"github.com/taskguard/taskguard/cloudlog",
	"github.com/taskguard/taskguard/app",
}

// TestImportSetsNoLogger: after the libraries' init functions, slog's and
// log's defaults are still the standard library's.
func TestImportSetsNoLogger(t *testing.T) {
	if h := fmt.Sprintf("%T", slog.Default().Handler()); h != "*slog.defaultHandler" {
		t.Errorf("slog.Default() handler is %s after importing the libraries; want the standard library's", h)
	}
	if log.Flags() != log.LstdFlags || log.Prefix() != "" {
		t.Errorf("log's defaults changed: flags %d prefix %q", log.Flags(), log.Prefix())
	}
}

// TestImportRegistersNoFunction: the libraries do not even link the
// Functions Framework's registry, so they cannot register a function; and
// taskguard's own names are free in this binary (the framework kills a
// process that registers a name twice).
func TestImportRegistersNoFunction(t *testing.T) {
	deps := goListDeps(t, libraries...)
	for _, p := range []string{
		"github.com/GoogleCloudPlatform/functions-framework-go/functions",
		"github.com/GoogleCloudPlatform/functions-framework-go/funcframework",
	} {
		if deps[p] {
			t.Errorf("the libraries link %s", p)
		}
	}
	for _, name := range []string{"Worker", "Enqueue", "CleanupLocks"} {
		functions.HTTP(name, func(http.ResponseWriter, *http.Request) {})
	}
}

// TestLibrariesLinkNoBackend: a program that imports the libraries gets
// the lock backends it imports itself, never Redis's or memcached's
// clients; only app, whose CleanupLocks deletes Datastore entities, links
// Datastore's.
func TestLibrariesLinkNoBackend(t *testing.T) {
	check := func(pkgs []string, unwanted ...string) {
		t.Helper()
		for p := range goListDeps(t, pkgs...) {
			for _, u := range unwanted {
				if strings.HasPrefix(p, u) {
					t.Errorf("%v link %s", pkgs, p)
				}
			}
		}
	}
	check(libraries, "github.com/redis/", "github.com/bradfitz/gomemcache",
		"github.com/taskguard/taskguard/locking/redislock", "github.com/taskguard/taskguard/locking/mclock")
	check(libraries[:len(libraries)-1], "cloud.google.com/go/datastore", "github.com/taskguard/taskguard/locking/dslock")
}

func goListDeps(t *testing.T, pkgs ...string) map[string]bool {
	t.Helper()
	out, err := exec.Command("go", append([]string{"list", "-deps", "-f", "{{.ImportPath}}"}, pkgs...)...).Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	deps := map[string]bool{}
	for _, p := range strings.Fields(string(out)) {
		deps[p] = true
	}
	if !deps["github.com/taskguard/taskguard/locking"] {
		t.Fatalf("go list -deps did not list the libraries: %s", out)
	}
	return deps
}
