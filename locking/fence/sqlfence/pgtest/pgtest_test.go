package pgtest_test

import (
	"testing"

	"github.com/taskguard/taskguard/locking/fence/sqlfence/pgtest"
)

func TestStart(t *testing.T) {
	db := pgtest.Start(t).Open(t)
	var v string
	if err := db.QueryRowContext(t.Context(), "SELECT current_setting('server_version_num')").Scan(&v); err != nil {
		t.Fatal(err)
	}
	if v == "" {
		t.Fatal("no server version")
	}
	t.Logf("PostgreSQL %s", v)
}
