package serverproc

import (
	"os/exec"
	"syscall"
)

// setPdeathsig makes the kernel kill the child when the test binary dies, so
// a crashed test run leaves no server behind. (Strictly, the signal comes
// when the OS thread that started the child exits; the Go runtime keeps its
// threads unless a goroutine locked to one ends, which tests here do not.)
func setPdeathsig(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
