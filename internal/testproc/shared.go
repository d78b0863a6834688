package testproc

import (
	"sync"
	"testing"
)

// Shared is one T (a test cluster, a server) shared by the tests of a
// package: Run runs the tests and stops it afterwards, Get starts it on the
// first call. A run that selects no test needing it starts nothing. Safe
// for parallel tests.
type Shared[T any] struct {
	mu      sync.Mutex
	running bool
	started bool
	value   T
	err     error
	stop    func(T)
}

// Run runs the package's tests (m.Run) and then stops the shared value
// with stop, if one was started. It returns m.Run's exit code.
func (s *Shared[T]) Run(m *testing.M, stop func(T)) int {
	s.mu.Lock()
	s.running, s.stop = true, stop
	s.mu.Unlock()

	code := m.Run()

	s.mu.Lock()
	defer s.mu.Unlock()
	s.running = false
	if s.started && s.err == nil {
		s.stop(s.value)
	}
	return code
}

// Get returns the shared value, starting it with start on the first call.
// It fails the test when it cannot start (every test that asks fails with
// the same reason), and with outsideRun when Run is not running the
// tests.
func (s *Shared[T]) Get(t testing.TB, outsideRun string, start func(logf func(string, ...any)) (T, error)) T {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.running {
		t.Fatal(outsideRun)
	}
	if !s.started {
		s.started = true
		s.value, s.err = start(t.Logf)
	}
	if s.err != nil {
		t.Fatal(s.err)
	}
	return s.value
}
