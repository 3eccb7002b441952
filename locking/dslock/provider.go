package dslock

import (
	"context"
	"os"

	"github.com/taskguard/taskguard/locking"
)

// Environment variables read by the provider that locking.Default uses.
const (
	// EnvDatabase names the Firestore-in-Datastore-mode database (Options.DatabaseID).
	EnvDatabase = "TASKGUARD_DATASTORE_DATABASE"
	// EnvNamespace names the Datastore namespace (Options.Namespace).
	EnvNamespace = "TASKGUARD_DATASTORE_NAMESPACE"
	// EnvKind names the entity kind (Options.Kind).
	EnvKind = "TASKGUARD_DATASTORE_KIND"
)

func init() {
	locking.RegisterProvider(locking.Strong, "datastore", provide)
}

// provide builds the Strong backend of locking.Default when the environment
// names a project (GOOGLE_CLOUD_PROJECT) or an emulator
// (DATASTORE_EMULATOR_HOST). Creating the connection does no network I/O.
func provide() (locking.Backend, bool, error) {
	if os.Getenv("GOOGLE_CLOUD_PROJECT") == "" && os.Getenv("DATASTORE_EMULATOR_HOST") == "" {
		return nil, false, nil
	}
	b, err := New(context.Background(), Options{
		DatabaseID: os.Getenv(EnvDatabase),
		Namespace:  os.Getenv(EnvNamespace),
		Kind:       os.Getenv(EnvKind),
	})
	if err != nil {
		return nil, true, err
	}
	return b, true, nil
}
