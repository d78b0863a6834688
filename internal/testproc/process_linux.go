package testproc

import "syscall"

// sysProcAttr makes the kernel kill the child when the test binary dies
// without cleaning up (a panic, a -timeout, a SIGKILL), so a server never
// outlives it. (The signal follows the OS thread that started the
// child; Go keeps its threads for the life of the process unless a
// goroutine exits while locked to one, which tests do not do.)
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
