package server

import (
	"container/list"
	"context"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/utils/clock"

	"github.com/meshca/meshca/identity"
)

// ReasonOverloaded is the reason label, in metrics and audit lines, of a
// request shed because the server's signing capacity was taken.
const ReasonOverloaded = "overloaded"

// The defaults of Admission's fields.
const (
	// DefaultMaxQueue bounds the requests waiting for signing capacity.
	DefaultMaxQueue = 4096
	// DefaultMaxWaitFirst is the longest a first certificate is expected
	// to wait for capacity before it is shed.
	DefaultMaxWaitFirst = 5 * time.Second
	// DefaultMaxWaitRenewal is the same for a renewal, which has half a
	// certificate's life to spare.
	DefaultMaxWaitRenewal = 250 * time.Millisecond
	// DefaultMaxHandshakes bounds the TLS handshakes in progress. It is
	// sized for callers far away: a handshake holds its slot for about
	// a round trip, so 256 slots serve 2,500 handshakes a second at
	// 100 ms, while bounding what a thundering herd costs in memory.
	DefaultMaxHandshakes = 256
	// handshakeTimeout bounds a connection's TLS and HTTP/2 handshake,
	// and so how long a caller that sends a little and stalls holds a
	// handshake slot.
	handshakeTimeout = 5 * time.Second
	// minRetryHint is the shortest retry hint sent with a shed request.
	minRetryHint = 100 * time.Millisecond
)

// Admission bounds the signing work the server does at once, over every
// API: checking a CSR's signature and signing a certificate. What cannot
// start at once waits in a queue; what would wait too long is shed at
// once with ResourceExhausted and a google.rpc.RetryInfo telling the
// caller when the queue ahead will have drained, instead of piling up
// until the server runs out of memory or every caller times out.
//
// Requests come in two classes. A caller that authenticates with a token
// is a workload without a certificate (a new pod, or one whose
// certificate is lost): it cannot serve until it has one. A caller that
// proves itself with its current certificate (mTLS renewal) still holds a
// valid one, and renews at half its life, so it has time to spare. First
// certificates are served before renewals, and renewals are shed first:
// in a restart storm, new pods come up while renewals wait their turn.
//
// Every field's zero value means its default, so the zero Admission is
// on; MaxInFlight < 0 turns admission off.
type Admission struct {
	// MaxInFlight bounds the requests checking a CSR or signing at once.
	// Zero means twice GOMAXPROCS: enough to keep every core busy while
	// a request is between its CPU steps, few enough that a request
	// admitted is served at once. Negative means no bound (and no queue).
	MaxInFlight int

	// MaxQueue bounds the requests waiting for capacity; more are shed.
	// Zero means DefaultMaxQueue.
	MaxQueue int

	// MaxWaitFirst and MaxWaitRenewal bound how long a first certificate,
	// and a renewal, may be expected to wait in the queue: a request that
	// would wait longer, or past its own deadline, is shed at once. Zero
	// means DefaultMaxWaitFirst and DefaultMaxWaitRenewal.
	MaxWaitFirst   time.Duration
	MaxWaitRenewal time.Duration

	// MaxHandshakes bounds the TLS handshakes in progress on a listener
	// wrapped by Server.LimitListener: at the bound, no connection is
	// accepted until a handshake ends (or times out, after 5s; a
	// connection that sends nothing gives its slot back after 1s). It is
	// not part of admission proper: MaxInFlight < 0 leaves it on. Zero
	// means DefaultMaxHandshakes; negative means no bound.
	MaxHandshakes int
}

// requestClass orders requests in the admission queue: lower first.
type requestClass int

const (
	classFirst requestClass = iota
	classRenewal
	numClasses
)

func (c requestClass) String() string {
	if c == classRenewal {
		return "renewal"
	}
	return "first"
}

// classOf returns the class of an authenticated caller: a renewal when it
// proved itself with a certificate it holds (over mTLS, or by an SVID
// proof in a batch).
func classOf(c identity.Caller) requestClass {
	switch c.Method {
	case identity.MethodMTLS, identity.MethodSVIDProof:
		return classRenewal
	}
	return classFirst
}

// admission is Admission at work: a counting semaphore with one FIFO
// queue per class, granted in class order.
type admission struct {
	slots    int
	maxQueue int
	maxWait  [numClasses]time.Duration
	// clock times the waits and the slots' hold times. A request's
	// deadline is wall time: with a clock other than the real one, the
	// wait it allows is measured from the clock's now.
	clock clock.Clock

	mu       sync.Mutex
	inFlight int
	queues   [numClasses]list.List // of *waiter

	// hold is a moving average of how long, in nanoseconds, a request
	// holds its slot: the queue drains at slots/hold a second.
	hold atomic.Int64

	inFlightGauge prometheus.Gauge
	depth         [numClasses]prometheus.Gauge
	shed          [numClasses]prometheus.Counter
	wait          [numClasses]prometheus.Observer
}

// waiter is a queued request. ready is closed once it holds a slot.
type waiter struct {
	ready   chan struct{}
	granted bool // under admission.mu
}

// initialHold is the slot hold time assumed before any is measured.
const initialHold = 500 * time.Microsecond

func newAdmission(a Admission, reg prometheus.Registerer, clk clock.Clock) (*admission, error) {
	switch {
	case a.MaxQueue < 0:
		return nil, fmt.Errorf("server: Admission.MaxQueue %d must not be negative", a.MaxQueue)
	case a.MaxWaitFirst < 0 || a.MaxWaitRenewal < 0:
		return nil, fmt.Errorf("server: Admission waits (%s, %s) must not be negative", a.MaxWaitFirst, a.MaxWaitRenewal)
	}
	if a.MaxInFlight < 0 {
		return nil, nil
	}
	if a.MaxInFlight == 0 {
		a.MaxInFlight = 2 * runtime.GOMAXPROCS(0)
	}
	if a.MaxQueue == 0 {
		a.MaxQueue = DefaultMaxQueue
	}
	if a.MaxWaitFirst == 0 {
		a.MaxWaitFirst = DefaultMaxWaitFirst
	}
	if a.MaxWaitRenewal == 0 {
		a.MaxWaitRenewal = DefaultMaxWaitRenewal
	}
	inFlight := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "meshca_signing_in_flight",
		Help: "Certificate requests checking a CSR or signing now, over every API.",
	})
	capacity := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "meshca_signing_capacity",
		Help: "The bound on certificate requests checking a CSR or signing at once (admission.maxInFlight).",
	})
	depth := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "meshca_signing_queue_depth",
		Help: "Certificate requests waiting for signing capacity, by class (first certificate or renewal).",
	}, []string{"class"})
	shed := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshca_signing_shed_total",
		Help: "Certificate requests shed with ResourceExhausted and a retry hint because signing capacity was taken, by class.",
	}, []string{"class"})
	wait := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "meshca_signing_queue_wait_seconds",
		Help:    "Time certificate requests waited in the queue for signing capacity, by class; requests served at once are not counted.",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
	}, []string{"class"})
	for _, col := range []prometheus.Collector{inFlight, capacity, depth, shed, wait} {
		if err := reg.Register(col); err != nil {
			return nil, fmt.Errorf("server: registering admission metrics: %w", err)
		}
	}
	capacity.Set(float64(a.MaxInFlight))
	ad := &admission{
		slots:         a.MaxInFlight,
		maxQueue:      a.MaxQueue,
		maxWait:       [numClasses]time.Duration{classFirst: a.MaxWaitFirst, classRenewal: a.MaxWaitRenewal},
		clock:         clk,
		inFlightGauge: inFlight,
	}
	for c := range numClasses {
		ad.depth[c] = depth.WithLabelValues(c.String())
		ad.shed[c] = shed.WithLabelValues(c.String())
		ad.wait[c] = wait.WithLabelValues(c.String())
	}
	ad.hold.Store(int64(initialHold))
	return ad, nil
}

// shedError is a request shed for want of capacity.
type shedError struct {
	class      requestClass
	queued     int
	retryAfter time.Duration
}

func (e *shedError) Error() string {
	return fmt.Sprintf("server: the CA is at capacity with %d requests queued, and would not serve this %s request in time; retry after the hinted delay",
		e.queued, e.class)
}

// status is ResourceExhausted with a google.rpc.RetryInfo detail.
func (e *shedError) status() *status.Status {
	return retryStatus(codes.ResourceExhausted, e.Error(), e.retryAfter)
}

// acquire waits for a slot for a request of class c, and returns when it
// got it, to be passed to release. It fails with a *shedError when the
// request would wait longer than its class may (or than its deadline
// allows), or when the queue is full, and with ctx's error. A nil
// admission admits every request at once.
func (a *admission) acquire(ctx context.Context, c requestClass) (time.Time, error) {
	if a == nil {
		return time.Time{}, nil
	}
	a.mu.Lock()
	ahead := a.queuedAhead(c)
	if ahead == 0 && a.inFlight < a.slots {
		a.inFlight++
		a.mu.Unlock()
		a.inFlightGauge.Inc()
		return a.clock.Now(), nil
	}
	total := a.queued()
	expected := a.drainTime(ahead + 1)
	limit := a.maxWait[c]
	if deadline, ok := ctx.Deadline(); ok {
		limit = min(limit, deadline.Sub(a.clock.Now()))
	}
	if total >= a.maxQueue || expected > limit {
		a.mu.Unlock()
		return time.Time{}, a.shedNow(c, total)
	}
	w := &waiter{ready: make(chan struct{})}
	elem := a.queues[c].PushBack(w)
	a.depth[c].Inc()
	a.mu.Unlock()
	queued := a.clock.Now()

	// Never wait longer than the request was admitted to, whatever the
	// estimate said.
	timer := a.clock.NewTimer(limit)
	defer timer.Stop()
	var err error
	select {
	case <-w.ready:
		a.wait[c].Observe(a.clock.Since(queued).Seconds())
		return a.clock.Now(), nil
	case <-ctx.Done():
		err = ctx.Err()
	case <-timer.C():
	}
	a.mu.Lock()
	granted := w.granted
	if !granted {
		a.queues[c].Remove(elem)
		a.depth[c].Dec()
	}
	total = a.queued()
	a.mu.Unlock()
	switch {
	case granted && err == nil:
		// The slot came as the wait ran out: take it.
		a.wait[c].Observe(a.clock.Since(queued).Seconds())
		return a.clock.Now(), nil
	case granted:
		// The slot came as the caller left: pass it on, unused, so
		// that it does not count in the hold time.
		a.handOff()
	}
	if err != nil {
		return time.Time{}, err
	}
	return time.Time{}, a.shedNow(c, total)
}

// shedNow counts a shed request of class c, with total requests queued,
// and returns its error, whose hint is when the queue will have drained.
func (a *admission) shedNow(c requestClass, total int) error {
	a.shed[c].Inc()
	return &shedError{class: c, queued: total, retryAfter: max(a.drainTime(total+1), minRetryHint)}
}

// drainTime estimates how long n queued requests take to be served: the
// queue drains at slots/hold a second.
func (a *admission) drainTime(n int) time.Duration {
	return time.Duration(n) * time.Duration(a.hold.Load()) / time.Duration(a.slots)
}

// queuedAhead returns how many queued requests would be served before a
// new one of class c. Under mu.
func (a *admission) queuedAhead(c requestClass) int {
	n := 0
	for k := range c + 1 {
		n += a.queues[k].Len()
	}
	return n
}

// queued returns how many requests wait. Under mu.
func (a *admission) queued() int {
	return a.queuedAhead(numClasses - 1)
}

// release gives back a slot taken at start (acquire's time): to the first
// waiter of the first class that has one, or to the pool. A nil admission
// has nothing to give back.
func (a *admission) release(start time.Time) {
	if a == nil {
		return
	}
	// An exponentially weighted moving average, 1/16 per request. Two
	// releases at once may lose one sample: it is an estimate.
	held := int64(a.clock.Since(start))
	old := a.hold.Load()
	a.hold.Store(old + (held-old)/16)
	a.handOff()
}

// handOff gives a slot to the first waiter of the first class that has
// one, or back to the pool.
func (a *admission) handOff() {
	a.mu.Lock()
	var next *waiter
	for c := range numClasses {
		if front := a.queues[c].Front(); front != nil {
			next = a.queues[c].Remove(front).(*waiter)
			next.granted = true
			a.depth[c].Dec()
			break
		}
	}
	if next == nil {
		a.inFlight--
	}
	a.mu.Unlock()
	if next == nil {
		a.inFlightGauge.Dec()
		return
	}
	close(next.ready)
}
