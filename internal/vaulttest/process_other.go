//go:build !linux

package vaulttest

import "syscall"

// sysProcAttr is the default: outside Linux nothing kills the children of a
// test binary that dies without cleaning up.
func sysProcAttr() *syscall.SysProcAttr { return nil }
