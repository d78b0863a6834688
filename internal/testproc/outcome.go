package testproc

import (
	"fmt"
	"runtime"
	"testing"
)

// Outcome is how a function given a testing.TB ended: FailMessage holds the
// message of a Fatal or FailNow, SkipMessage that of a Skip. It lets the
// tests of a test helper (kubetest, vaulttest) check that the helper fails
// or skips for the right reason, without failing themselves.
type Outcome struct {
	testing.TB
	FailMessage, SkipMessage string
}

func (o *Outcome) Fatal(args ...any) { o.FailMessage = fmt.Sprint(args...); runtime.Goexit() }
func (o *Outcome) Fatalf(format string, args ...any) {
	o.FailMessage = fmt.Sprintf(format, args...)
	runtime.Goexit()
}
func (o *Outcome) FailNow()         { o.FailMessage = "FailNow"; runtime.Goexit() }
func (o *Outcome) Skip(args ...any) { o.SkipMessage = fmt.Sprint(args...); runtime.Goexit() }
func (o *Outcome) Skipf(format string, args ...any) {
	o.SkipMessage = fmt.Sprintf(format, args...)
	runtime.Goexit()
}
func (o *Outcome) SkipNow() { o.SkipMessage = "SkipNow"; runtime.Goexit() }

// RunTB runs f with an Outcome over t, in a goroutine of its own since
// Fatal and Skip end it, and returns how it ended. When f returns, FailMessage
// is set to returned: what f did instead of failing or skipping.
func RunTB(t testing.TB, returned string, f func(testing.TB)) *Outcome {
	o := &Outcome{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		f(o)
		o.FailMessage = returned
	}()
	<-done
	return o
}
