// Command taskguard inspects and manages taskguard's locks and tasks: list,
// show and force-release the locks stored in Cloud Datastore, delete expired
// ones, and enqueue a task by hand.
//
// Install it with
//
//	go install github.com/taskguard/taskguard/cmd/taskguard@latest
//
// and run "taskguard help" for the commands. It talks to Cloud Datastore with
// application default credentials (gcloud auth application-default login),
// or to the Datastore emulator named by DATASTORE_EMULATOR_HOST; to Cloud
// Tasks likewise, or to the emulator named by CLOUD_TASKS_EMULATOR_HOST.
//
// Exit status: 0 on success, 1 when the operation failed (including a lock
// that does not exist), 2 on a usage error (unknown command or flag, missing
// argument or configuration).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

// Exit statuses.
const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// command is one leaf command, such as "locks list".
type command struct {
	path     string // "locks list"
	summary  string // one line, lower case
	synopsis string // the arguments after the path
	desc     string // DESCRIPTION paragraphs
	examples string
	// flags defines the command's flags on fs and returns the function that
	// runs it with the positional arguments.
	flags func(fs *flag.FlagSet, env *environment) func(ctx context.Context, args []string) error
	// nargs is the number of positional arguments the command takes.
	nargs int
}

// environment is what commands share: output streams and the lookup of
// environment variables (os.Getenv; tests use the real one through t.Setenv).
type environment struct {
	stdout, stderr io.Writer
	getenv         func(string) string
}

// usageError is a mistake in the command line: exit status 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{fmt.Sprintf(format, args...)}
}

// groups lists the command groups and their commands, in help order.
var groups = []struct {
	name, summary string
	commands      []*command
}{
	{"locks", "inspect and manage locks stored in Cloud Datastore", []*command{cmdLocksList, cmdLocksShow, cmdLocksRelease, cmdLocksCleanup}},
	{"tasks", "enqueue tasks for a taskguard worker", []*command{cmdTasksEnqueue}},
}

// run runs the command line args (without the program name) and returns the
// exit status. Output goes to stdout; errors, warnings and audit records to
// stderr.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	env := &environment{stdout: stdout, stderr: stderr, getenv: os.Getenv}
	if len(args) == 0 {
		printTop(stderr)
		return exitUsage
	}
	switch args[0] {
	case "help", "-h", "-help", "--help":
		return help(env, args[1:])
	}
	for _, g := range groups {
		if args[0] != g.name {
			continue
		}
		if len(args) == 1 {
			fmt.Fprintf(stderr, "ERROR: (taskguard.%s) command required\n\n", g.name)
			printGroup(stderr, g.name)
			return exitUsage
		}
		switch args[1] {
		case "help", "-h", "-help", "--help":
			printGroup(stdout, g.name)
			return exitOK
		}
		for _, c := range g.commands {
			if c.path == g.name+" "+args[1] {
				return runCommand(ctx, env, c, args[2:])
			}
		}
		fmt.Fprintf(stderr, "ERROR: (taskguard.%s) invalid choice: %q\n\n", g.name, args[1])
		printGroup(stderr, g.name)
		return exitUsage
	}
	fmt.Fprintf(stderr, "ERROR: (taskguard) invalid choice: %q\n\n", args[0])
	printTop(stderr)
	return exitUsage
}

func runCommand(ctx context.Context, env *environment, c *command, args []string) int {
	scope := "taskguard." + strings.ReplaceAll(c.path, " ", ".")
	fs := flag.NewFlagSet(c.path, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	do := c.flags(fs, env)
	pos, err := parse(fs, args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		printCommand(env.stdout, c)
		return exitOK
	case err != nil:
		fmt.Fprintf(env.stderr, "ERROR: (%s) %v\nUsage: taskguard %s %s\nRun 'taskguard %s --help' for details.\n", scope, err, c.path, c.synopsis, c.path)
		return exitUsage
	case len(pos) != c.nargs:
		msg := fmt.Sprintf("unexpected arguments: %q", pos)
		if len(pos) < c.nargs {
			msg = "missing argument"
		}
		fmt.Fprintf(env.stderr, "ERROR: (%s) %s\nUsage: taskguard %s %s\nRun 'taskguard %s --help' for details.\n", scope, msg, c.path, c.synopsis, c.path)
		return exitUsage
	}
	err = do(ctx, pos)
	var ue *usageError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &ue):
		fmt.Fprintf(env.stderr, "ERROR: (%s) %v\nRun 'taskguard %s --help' for details.\n", scope, err, c.path)
		return exitUsage
	default:
		fmt.Fprintf(env.stderr, "ERROR: (%s) %v\n", scope, err)
		return exitFailure
	}
}

// parse parses flags and positional arguments in any order, as gcloud does
// ("locks show ID --json" and "locks show --json ID" both work); "--" ends
// the flags.
func parse(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		if args[0] == "--" {
			return append(pos, args[1:]...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}
