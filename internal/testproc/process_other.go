//go:build !linux

package testproc

import "syscall"

// sysProcAttr is the default: outside Linux nothing kills the children of a
// test binary that dies without cleaning up.
func sysProcAttr() *syscall.SysProcAttr { return nil }
