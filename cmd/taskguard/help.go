package main

import (
	"flag"
	"fmt"
	"io"
	"strings"
)

// help prints the help of the command named by args ("", "locks",
// "locks list", …).
func help(env *environment, args []string) int {
	switch len(args) {
	case 0:
		printTop(env.stdout)
		return exitOK
	case 1:
		for _, g := range groups {
			if g.name == args[0] {
				printGroup(env.stdout, g.name)
				return exitOK
			}
		}
	case 2:
		for _, g := range groups {
			for _, c := range g.commands {
				if c.path == args[0]+" "+args[1] {
					printCommand(env.stdout, c)
					return exitOK
				}
			}
		}
	}
	fmt.Fprintf(env.stderr, "ERROR: (taskguard.help) no help for %q\n\n", strings.Join(args, " "))
	printTop(env.stderr)
	return exitUsage
}

func printTop(w io.Writer) {
	fmt.Fprint(w, `NAME
    taskguard - inspect and manage taskguard locks and tasks

SYNOPSIS
    taskguard GROUP COMMAND [FLAGS] [ARGS]

DESCRIPTION
    Operator's tool for taskguard: see which locks are held, by whom and
    under which fencing token; break a stuck lock; delete expired lock
    entities; enqueue a task by hand.

    Locks are read from Cloud Datastore (Firestore in Datastore mode) with
    application default credentials, or from the emulator named by
    DATASTORE_EMULATOR_HOST. Tasks go to Cloud Tasks, or to the emulator
    named by CLOUD_TASKS_EMULATOR_HOST.

GROUPS
`)
	for _, g := range groups {
		fmt.Fprintf(w, "    %-10s %s\n", g.name, capital(g.summary)+".")
	}
	fmt.Fprint(w, `
EXIT STATUS
    0 on success, 1 when the operation failed, 2 on a usage error.

    Run 'taskguard GROUP --help' or 'taskguard GROUP COMMAND --help' for
    details.
`)
}

func printGroup(w io.Writer, name string) {
	for _, g := range groups {
		if g.name != name {
			continue
		}
		fmt.Fprintf(w, "NAME\n    taskguard %s - %s\n\nSYNOPSIS\n    taskguard %s COMMAND [FLAGS] [ARGS]\n\nCOMMANDS\n", g.name, g.summary, g.name)
		for _, c := range g.commands {
			fmt.Fprintf(w, "    %-10s %s\n", strings.TrimPrefix(c.path, g.name+" "), capital(c.summary)+".")
		}
		fmt.Fprintf(w, "\n    Run 'taskguard %s COMMAND --help' for details.\n", g.name)
	}
}

func printCommand(w io.Writer, c *command) {
	fmt.Fprintf(w, "NAME\n    taskguard %s - %s\n\nSYNOPSIS\n    taskguard %s %s\n\nDESCRIPTION\n%s\n", c.path, c.summary, c.path, c.synopsis, indent(c.desc))
	fs := flag.NewFlagSet(c.path, flag.ContinueOnError)
	c.flags(fs, &environment{getenv: func(string) string { return "" }})
	fmt.Fprint(w, "\nFLAGS\n")
	fs.VisitAll(func(f *flag.Flag) {
		name, usage := flag.UnquoteUsage(f)
		if name != "" {
			fmt.Fprintf(w, "    --%s=%s\n", f.Name, strings.ToUpper(name))
		} else {
			fmt.Fprintf(w, "    --%s\n", f.Name)
		}
		if f.DefValue != "" && f.DefValue != "false" && f.DefValue != "0" && f.DefValue != "0s" {
			usage += " Default: " + f.DefValue + "."
		}
		fmt.Fprintf(w, "%s\n", wrap(usage, "        ", 76))
	})
	if c.examples != "" {
		fmt.Fprintf(w, "\nEXAMPLES\n%s\n", indent(c.examples))
	}
}

func capital(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}

// indent indents every non-empty line of s by four spaces.
func indent(s string) string {
	lines := strings.Split(strings.Trim(s, "\n"), "\n")
	for i, l := range lines {
		if l != "" {
			lines[i] = "    " + l
		}
	}
	return strings.Join(lines, "\n")
}

// wrap fills text into lines of at most width columns, each starting with
// prefix.
func wrap(text, prefix string, width int) string {
	var b strings.Builder
	line := prefix
	for _, word := range strings.Fields(text) {
		if len(line) > len(prefix) && len(line)+1+len(word) > width {
			b.WriteString(line + "\n")
			line = prefix
		}
		if len(line) > len(prefix) {
			line += " "
		}
		line += word
	}
	b.WriteString(line)
	return b.String()
}
