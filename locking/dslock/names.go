package dslock

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"unicode/utf8"
)

// Datastore's limits on the names a Backend is configured with. A name that
// breaks one is refused by every RPC, so New refuses it first.
const (
	// MaxKindBytes is the longest kind name Datastore accepts, in bytes.
	MaxKindBytes = 1500
	// MaxNamespaceBytes is the longest namespace Datastore accepts, in bytes.
	MaxNamespaceBytes = 1500
)

var (
	// Datastore reserves every name that starts and ends with two
	// underscores (__kind__, __namespace__, ...).
	reservedRE = regexp.MustCompile(`^__.*__$`)
	// A database id is 4-63 characters of [a-z0-9-], starting with a letter
	// and ending with a letter or digit, not shaped like a UUID; or
	// "(default)".
	databaseRE = regexp.MustCompile(`^[a-z][a-z0-9-]{2,61}[a-z0-9]$`)
	uuidRE     = regexp.MustCompile(`^[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$`)
)

// CheckDatabaseID returns an error wrapping ErrBadOptions, naming id, when
// Datastore would refuse id as a database id (Options.DatabaseID): it must
// be empty (the default database), "(default)", or 4 to 63 characters of
// lowercase letters, digits and hyphens, starting with a letter, ending with
// a letter or a digit and not shaped like a UUID.
func CheckDatabaseID(id string) error {
	if id == "" || id == "(default)" || (databaseRE.MatchString(id) && !uuidRE.MatchString(id)) {
		return nil
	}
	return fmt.Errorf("%w: database id %q: want 4-63 of a-z, 0-9 and '-', starting with a letter, ending with a letter or digit, not a UUID", ErrBadOptions, id)
}

// CheckNamespace returns an error wrapping ErrBadOptions, naming ns, when
// Datastore would refuse ns as a namespace (Options.Namespace): it must be
// valid UTF-8 of at most MaxNamespaceBytes bytes with no '/' and no NUL, and
// must not be reserved (start and end with "__").
func CheckNamespace(ns string) error {
	switch {
	case len(ns) > MaxNamespaceBytes:
		return fmt.Errorf("%w: namespace %.40q...: %d bytes, longer than %d", ErrBadOptions, ns, len(ns), MaxNamespaceBytes)
	case !utf8.ValidString(ns):
		return fmt.Errorf("%w: namespace %q: not valid UTF-8", ErrBadOptions, ns)
	case strings.ContainsAny(ns, "/\x00"):
		return fmt.Errorf("%w: namespace %q: contains '/' or NUL", ErrBadOptions, ns)
	case reservedRE.MatchString(ns):
		return fmt.Errorf("%w: namespace %q: names matching __.*__ are reserved by Datastore", ErrBadOptions, ns)
	}
	return nil
}

// CheckKind returns an error wrapping ErrBadOptions, naming kind, when
// Datastore would refuse kind as the lock entities' kind (Options.Kind): it
// must be valid UTF-8 of at most MaxKindBytes bytes with no NUL, and must not
// start with "__" (reserved).
func CheckKind(kind string) error {
	switch {
	case len(kind) > MaxKindBytes:
		return fmt.Errorf("%w: kind %.40q...: %d bytes, longer than %d", ErrBadOptions, kind, len(kind), MaxKindBytes)
	case !utf8.ValidString(kind):
		return fmt.Errorf("%w: kind %q: not valid UTF-8", ErrBadOptions, kind)
	case strings.ContainsRune(kind, 0):
		return fmt.Errorf("%w: kind %q: contains NUL", ErrBadOptions, kind)
	case strings.HasPrefix(kind, "__"):
		return fmt.Errorf("%w: kind %q: names starting with __ are reserved by Datastore", ErrBadOptions, kind)
	}
	return nil
}

// checkNames returns every problem of the three names at once, joined.
func checkNames(database, namespace, kind string) error {
	return errors.Join(CheckDatabaseID(database), CheckNamespace(namespace), CheckKind(kind))
}
