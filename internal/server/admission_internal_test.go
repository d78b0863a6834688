package server

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/require"
	clocktesting "k8s.io/utils/clock/testing"
)

// queuedNow returns how many requests wait in a.
func queuedNow(a *admission) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.queued()
}

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	require.NoError(t, c.Write(&m))
	return m.GetCounter().GetValue()
}

// acquireAsync acquires a slot of class c on its own goroutine, holds it
// for no time (on a fake clock) and releases it; its error arrives on the
// channel.
func acquireAsync(a *admission, c requestClass) <-chan error {
	done := make(chan error, 1)
	go func() {
		start, err := a.acquire(context.Background(), c)
		if err == nil {
			a.release(start)
		}
		done <- err
	}()
	return done
}

// TestAdmissionRetryHint: the hold time is a moving average of how long
// slots are held, on the admission's clock, and a shed request's hint is
// how long the queue ahead of it takes to drain at that pace.
func TestAdmissionRetryHint(t *testing.T) {
	// An hour ahead of the wall clock: a deadline measured on the wall
	// clock would allow an hour's wait.
	clk := clocktesting.NewFakeClock(time.Now().Add(time.Hour))
	a, err := newAdmission(Admission{MaxInFlight: 1, MaxQueue: 2, MaxWaitFirst: time.Hour}, prometheus.NewRegistry(), clk)
	require.NoError(t, err)
	require.Equal(t, int64(initialHold), a.hold.Load())

	// A slot held for 1,600.5 ms moves the average a sixteenth of the
	// way from 0.5 ms: to 100.5 ms.
	start, err := a.acquire(t.Context(), classFirst)
	require.NoError(t, err)
	clk.Step(1600500 * time.Microsecond)
	a.release(start)
	require.Equal(t, int64(100500*time.Microsecond), a.hold.Load())

	// One request holds the slot, two wait; the queue is full, and the
	// next is shed at once with the time three requests take.
	holder, err := a.acquire(t.Context(), classFirst)
	require.NoError(t, err)
	waiting := []<-chan error{acquireAsync(a, classFirst), acquireAsync(a, classFirst)}
	require.Eventually(t, func() bool { return queuedNow(a) == 2 }, 10*time.Second, time.Millisecond)
	_, err = a.acquire(t.Context(), classFirst)
	var shed *shedError
	require.ErrorAs(t, err, &shed)
	require.Equal(t, classFirst, shed.class)
	require.Equal(t, 2, shed.queued)
	require.Equal(t, 3*100500*time.Microsecond, shed.retryAfter)
	require.Equal(t, 1.0, counterValue(t, a.shed[classFirst]))

	// A request whose deadline comes before its turn is shed at once too,
	// though the queue has room: the wait it may take is measured on the
	// admission's clock.
	a.maxQueue = 3
	ctx, cancel := context.WithDeadline(t.Context(), clk.Now().Add(250*time.Millisecond))
	defer cancel()
	result := make(chan error, 1)
	go func() {
		_, err := a.acquire(ctx, classFirst)
		result <- err
	}()
	select {
	case err = <-result:
	case <-time.After(10 * time.Second):
		t.Fatal("a request that could not be served before its deadline was queued")
	}
	require.ErrorAs(t, err, &shed)
	require.Equal(t, 2, queuedNow(a), "the request never queued")

	// The holder's release serves the waiters in turn.
	a.release(holder)
	for _, done := range waiting {
		require.NoError(t, <-done)
	}
	require.Zero(t, queuedNow(a))
	require.Zero(t, a.inFlight)
}

// TestAdmissionWaitBoundOnTheClock: a queued request waits as long as its
// class may on the admission's clock, not a moment more, and then leaves
// the queue shed.
func TestAdmissionWaitBoundOnTheClock(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	a, err := newAdmission(Admission{MaxInFlight: 1, MaxWaitRenewal: 200 * time.Millisecond}, prometheus.NewRegistry(), clk)
	require.NoError(t, err)
	holder, err := a.acquire(t.Context(), classFirst)
	require.NoError(t, err)

	done := acquireAsync(a, classRenewal)
	require.Eventually(t, clk.HasWaiters, 10*time.Second, time.Millisecond, "the renewal never started its wait")
	require.Equal(t, 1, queuedNow(a))
	// The fake clock fires a timer within Step: after 199 ms the
	// renewal's is still set, and the renewal still queued.
	clk.Step(199 * time.Millisecond)
	require.True(t, clk.HasWaiters(), "the renewal's wait ended before 200ms")
	require.Equal(t, 1, queuedNow(a))
	clk.Step(time.Millisecond)
	var shed *shedError
	require.ErrorAs(t, <-done, &shed)
	require.Equal(t, classRenewal, shed.class)
	require.Zero(t, queuedNow(a))
	require.Equal(t, 1.0, counterValue(t, a.shed[classRenewal]))

	a.release(holder)
	require.Zero(t, a.inFlight)
}
