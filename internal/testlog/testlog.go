// Package testlog is a log destination for tests: a buffer that a
// logger's goroutines (or a child process's output, copied by os/exec)
// write while the test reads it.
package testlog

import (
	"bytes"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Buffer is a bytes.Buffer safe for concurrent writes and reads. The zero
// value is empty and ready.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String returns what has been written so far.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// WaitFor waits until the buffer holds s, and fails t after 10 s. What a
// server writes before it answers a request may arrive after the answer:
// through a pipe copied by a goroutine of os/exec, or from a goroutine of
// its own.
func (b *Buffer) WaitFor(t testing.TB, s string) {
	t.Helper()
	require.Eventually(t, func() bool { return strings.Contains(b.String(), s) }, 10*time.Second, 5*time.Millisecond,
		"%q was never written; the buffer holds:\n%s", s, b.String())
}
