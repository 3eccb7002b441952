package libcheck

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// envOwners names, for environment variables that more than one package
// cares about, the only directories whose (non-test) code reads them with
// os.Getenv: each variable has one parser, in the package that uses it;
// others take what it parsed (app's TASKGUARD_LOG_LEVEL goes through one
// function, logLevel). dstest, the emulator starter for tests, reads the
// emulator's own variables.
var envOwners = map[string][]string{
	"GOOGLE_CLOUD_PROJECT":    {"locking/dslock"},
	"DATASTORE_EMULATOR_HOST": {"locking/dslock", "locking/dslock/dstest"},
	"DATASTORE_PROJECT_ID":    {"locking/dslock", "locking/dslock/dstest"},
	"TASKGUARD_LOG_LEVEL":     {},
}

// TestEachVariableReadByItsOwner fails when code outside a variable's owner
// reads it by name.
func TestEachVariableReadByItsOwner(t *testing.T) {
	root := filepath.Join("..", "..")
	getenv := regexp.MustCompile(`(?:Getenv|LookupEnv)\("([A-Z_]+)"\)`)
	var logLevelReads int
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if name := d.Name(); name != "." && name != ".." && (strings.HasPrefix(name, ".") || name == "examples" || name == "testdata") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		raw, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		var code []string // comments may show a read (a doc example); code may not
		for _, line := range strings.Split(string(raw), "\n") {
			if !strings.HasPrefix(strings.TrimSpace(line), "//") {
				code = append(code, line)
			}
		}
		src := strings.Join(code, "\n")
		rel, _ := filepath.Rel(root, filepath.Dir(path))
		rel = filepath.ToSlash(rel)
		logLevelReads += strings.Count(src, "Getenv(EnvLogLevel)") + strings.Count(src, "Getenv(app.EnvLogLevel)")
		for _, m := range getenv.FindAllStringSubmatch(src, -1) {
			owners, watched := envOwners[m[1]]
			if !watched {
				continue
			}
			ok := false
			for _, o := range owners {
				ok = ok || rel == o
			}
			if !ok {
				t.Errorf("%s reads %s; only %v may (the others take what its owner parsed)", path, m[1], owners)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if logLevelReads > 0 {
		t.Errorf("TASKGUARD_LOG_LEVEL is read %d times by name; app's logLevel is its one parser", logLevelReads)
	}
}
