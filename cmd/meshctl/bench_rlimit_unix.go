//go:build unix

package main

import (
	"fmt"
	"syscall"
)

// raiseFileLimit raises this process's soft limit of open files
// (RLIMIT_NOFILE) to its hard limit, and returns the limit in force.
func raiseFileLimit() (uint64, error) {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return 0, fmt.Errorf("reading RLIMIT_NOFILE: %w", err)
	}
	if l.Cur >= l.Max {
		return uint64(l.Cur), nil
	}
	raised := l
	raised.Cur = l.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised); err != nil {
		// Some systems cap the soft limit below the hard one.
		return uint64(l.Cur), nil
	}
	return uint64(raised.Cur), nil
}
