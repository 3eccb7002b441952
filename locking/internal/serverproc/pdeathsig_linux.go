package serverproc

import (
	"os/exec"
	"syscall"
)

// setPdeathsig makes the kernel kill the child when the test binary dies, so
// a crashed test run leaves no server behind.
func setPdeathsig(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
