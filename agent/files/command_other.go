//go:build !unix

package files

import "os/exec"

// killGroup leaves cmd's cancellation as it is: the process is killed.
func killGroup(*exec.Cmd) {}
