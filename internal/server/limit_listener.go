package server

import (
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/credentials"
)

// LimitListener returns l bounded as meshca-server serves it:
//
//   - to Admission.MaxHandshakes TLS handshakes in progress at once, over
//     every source: while that many are in progress, l returns no more
//     connections (one waits, accepted, for a slot), so
//     that a restart storm waits in the kernel's accept backlog (which
//     costs the server nothing, and makes callers' TCP stacks back off)
//     instead of as thousands of half-open TLS connections sharing the CPU
//     and memory until they all time out;
//   - to Limits.MaxConnectionsPerSource open connections from one source:
//     a connection over that bound is closed as soon as it is accepted,
//     before any TLS work, and counted in
//     meshca_limit_refused_total{what="connection"}. The caller sees its
//     connection closed (gRPC's Unavailable) and may retry once it closes
//     another.
//
// The handshake bound needs the server's own transport credentials
// (GRPCServer), which say when a handshake is over. With neither bound,
// LimitListener returns l itself.
func (s *Server) LimitListener(l net.Listener) net.Listener {
	if s.limits.conns == nil && s.handshakes == nil {
		return l
	}
	return &limitListener{Listener: l, limits: s.limits, handshakes: s.handshakes, closed: make(chan struct{})}
}

type limitListener struct {
	net.Listener
	limits     *limiter
	handshakes *handshakeGate

	closeOnce sync.Once
	closed    chan struct{}
}

// Accept returns the next connection within the bounds; those over the
// per-source bound are closed and never returned, so that the server's
// accept loop does not back off on them.
func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		lc := &limitConn{Conn: c}
		// A source over its bound is closed before it waits for a
		// handshake slot.
		if l.limits.conns != nil {
			src := sourceOf(c.RemoteAddr())
			if !l.limits.conns.acquire(src) {
				l.limits.refused.WithLabelValues("connection").Inc()
				c.Close()
				continue
			}
			l.limits.connsOpen.Inc()
			lc.release = sync.OnceFunc(func() {
				l.limits.conns.release(src)
				l.limits.connsOpen.Dec()
			})
		}
		// The next connection waits here, accepted, while the bound is
		// reached; the ones after it wait in the kernel's backlog.
		if !l.handshakes.acquire(l.closed) {
			lc.Close()
			return nil, net.ErrClosed
		}
		if l.handshakes != nil {
			lc.gate(l.handshakes)
		}
		return lc, nil
	}
}

// Close closes the listener and ends an Accept waiting for a handshake to
// finish.
func (l *limitListener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return l.Listener.Close()
}

// limitConn gives back its handshake slot when its handshake is over, when
// it closes, when it has sent nothing firstBytesTimeout after it was
// accepted, or handshakeTimeout after it was accepted (should the server's
// credentials not say when the handshake is over), whichever comes first;
// and its per-source count on its first Close. Either may be nil.
type limitConn struct {
	net.Conn
	handshakeDone func()
	release       func()

	// read is set once the connection has sent a byte.
	read atomic.Bool
}

// firstBytesTimeout is how long a connection holds a handshake slot
// without sending a byte: a caller that connects and says nothing (an
// idle or hostile one) does not hold the slot for the whole handshake
// timeout. Its handshake may still go on, outside the bound.
const firstBytesTimeout = time.Second

// gate makes c hold a slot of g until its handshake is over.
func (c *limitConn) gate(g *handshakeGate) {
	release := sync.OnceFunc(g.release)
	silent := time.AfterFunc(firstBytesTimeout, func() {
		if !c.read.Load() {
			release()
		}
	})
	backstop := time.AfterFunc(handshakeTimeout, release)
	c.handshakeDone = func() {
		silent.Stop()
		backstop.Stop()
		release()
	}
}

func (c *limitConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 && c.handshakeDone != nil && !c.read.Load() {
		c.read.Store(true)
	}
	return n, err
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.finishHandshake()
	if c.release != nil {
		c.release()
	}
	return err
}

func (c *limitConn) finishHandshake() {
	if c.handshakeDone != nil {
		c.handshakeDone()
	}
}

// handshakeGate bounds the TLS handshakes in progress. A nil gate bounds
// nothing.
type handshakeGate struct {
	slots chan struct{}
}

// acquire takes a slot, waiting for one; it reports false when closed
// closes first.
func (g *handshakeGate) acquire(closed <-chan struct{}) bool {
	if g == nil {
		return true
	}
	select {
	case g.slots <- struct{}{}:
		return true
	case <-closed:
		return false
	}
}

func (g *handshakeGate) release() {
	if g != nil {
		<-g.slots
	}
}

// gatedCreds are the server's transport credentials, telling a connection
// from LimitListener when its handshake is over.
type gatedCreds struct {
	credentials.TransportCredentials
}

func (c gatedCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := c.TransportCredentials.ServerHandshake(raw)
	if lc, ok := raw.(*limitConn); ok {
		lc.finishHandshake()
	}
	return conn, info, err
}

func (c gatedCreds) Clone() credentials.TransportCredentials {
	return gatedCreds{TransportCredentials: c.TransportCredentials.Clone()}
}

// newHandshakeGate returns the gate of Admission.MaxHandshakes, nil when
// it is negative (no bound), with its metrics.
func newHandshakeGate(max int, reg prometheus.Registerer) (*handshakeGate, error) {
	if max < 0 {
		return nil, nil
	}
	if max == 0 {
		max = DefaultMaxHandshakes
	}
	g := &handshakeGate{slots: make(chan struct{}, max)}
	for _, col := range []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "meshca_tls_handshakes_in_progress",
			Help: "TLS handshakes in progress on the gRPC listener; at admission.maxHandshakes, no more connections are accepted until one ends.",
		}, func() float64 { return float64(len(g.slots)) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "meshca_tls_handshake_capacity",
			Help: "The bound on TLS handshakes in progress (admission.maxHandshakes).",
		}, func() float64 { return float64(max) }),
	} {
		if err := reg.Register(col); err != nil {
			return nil, fmt.Errorf("server: registering handshake metrics: %w", err)
		}
	}
	return g, nil
}
