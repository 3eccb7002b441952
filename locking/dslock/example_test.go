package dslock_test

import (
	"context"
	"log"
	"net/http"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
)

// A Backend passed to locking.New guards work across every instance that
// shares the Datastore database. (Examples here are compiled, not run: they
// need a Datastore.)
func Example() {
	ctx := context.Background()
	b, err := dslock.New(ctx, dslock.Options{ProjectID: "my-project", Namespace: "locks"})
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	c, err := locking.New(locking.Config{Strong: b})
	if err != nil {
		log.Fatal(err)
	}
	err = c.With(ctx, "user-42", func(ctx context.Context) error {
		// Runs in at most one instance at a time. Pass
		// locking.FromContext(ctx).Token() to downstream writes to fence them.
		return nil
	})
	if err != nil {
		log.Print(err)
	}
}

// Cleanup belongs in a function that Cloud Scheduler calls, bounded by the
// request's deadline; what is left over is deleted by the next run.
func ExampleBackend_Cleanup() {
	b, err := dslock.New(context.Background(), dslock.Options{})
	if err != nil {
		log.Fatal(err)
	}
	http.HandleFunc("/cleanup-locks", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Minute)
		defer cancel()
		rep, err := b.Cleanup(ctx, dslock.CleanupOptions{Grace: time.Hour})
		log.Printf("lock cleanup: %+v", rep)
		if err != nil && rep.Errors > 0 {
			http.Error(w, err.Error(), http.StatusInternalServerError)
		}
	})
}
