//go:build unix

package main

import (
	"fmt"
	"syscall"
)

// fileLimit returns this process's limit of open files (RLIMIT_NOFILE's
// soft limit). Go's os package has already raised it to the hard limit at
// startup, where the system allows.
func fileLimit() (uint64, error) {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return 0, fmt.Errorf("reading RLIMIT_NOFILE: %w", err)
	}
	return uint64(l.Cur), nil
}
