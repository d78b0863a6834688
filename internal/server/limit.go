package server

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/time/rate"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"k8s.io/utils/clock"

	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
)

// DefaultMaxTrackedKeys is the default bound on the sources, and on the
// identities, a rate limit keeps a bucket for.
const DefaultMaxTrackedKeys = 100_000

// ReasonRateLimited is the reason label, in metrics and audit lines, of a
// request refused by a rate limit.
const ReasonRateLimited = "rate_limited"

// Limits bound what one source address or one identity may ask of the
// server. Every bound is off at its zero value: the defaults cannot know
// whether one address is one pod or a whole cluster behind NAT, or how
// many pods share an identity (docs/limits.md gives recommended values).
//
// A source is the caller's IP address as the server sees it; IPv6
// addresses count by their /64 prefix, which one host usually holds whole.
type Limits struct {
	// PerSource bounds the certificate requests of one source, on every
	// API together. It is checked before authentication, so that a flood
	// costs no token review and no signature check.
	PerSource Rate

	// PerIdentity bounds the certificate requests of one authenticated
	// identity, on every API together (the native, Istio and Linkerd APIs
	// share one bucket per SPIFFE ID). It is checked after authentication
	// and before the CSR is verified.
	PerIdentity Rate

	// MaxConnectionsPerSource bounds the open connections of one source,
	// on a listener wrapped by Server.LimitListener.
	MaxConnectionsPerSource int

	// MaxWatchStreamsPerSource bounds the bundle watch streams
	// (meshca.v1.BundleService/WatchBundle) open from one source.
	MaxWatchStreamsPerSource int

	// MaxTrackedKeys bounds how many sources, and how many identities, the
	// rate limits keep a bucket for; zero means DefaultMaxTrackedKeys. A
	// bucket left idle long enough to be full again is dropped at once;
	// past the bound, the least recently used is dropped (and counted).
	MaxTrackedKeys int
}

// Rate is a token bucket: PerSecond requests a second on average, and
// Burst at once.
type Rate struct {
	// PerSecond is the sustained rate; zero means no limit.
	PerSecond float64

	// Burst is how many requests may come at once; zero means PerSecond
	// rounded up, at least one.
	Burst int
}

func (r Rate) complete(name string) (Rate, error) {
	switch {
	case math.IsNaN(r.PerSecond) || math.IsInf(r.PerSecond, 0) || r.PerSecond < 0:
		return r, fmt.Errorf("server: Limits.%s.PerSecond %v: want a number of requests a second, 0 for no limit", name, r.PerSecond)
	case r.Burst < 0:
		return r, fmt.Errorf("server: Limits.%s.Burst %d must not be negative", name, r.Burst)
	}
	if r.PerSecond > 0 && r.Burst == 0 {
		r.Burst = int(math.Max(1, math.Ceil(r.PerSecond)))
	}
	return r, nil
}

func (l Limits) complete() (Limits, error) {
	var errs []error
	var err error
	if l.PerSource, err = l.PerSource.complete("PerSource"); err != nil {
		errs = append(errs, err)
	}
	if l.PerIdentity, err = l.PerIdentity.complete("PerIdentity"); err != nil {
		errs = append(errs, err)
	}
	if l.MaxConnectionsPerSource < 0 || l.MaxWatchStreamsPerSource < 0 || l.MaxTrackedKeys < 0 {
		errs = append(errs, errors.New("server: Limits: MaxConnectionsPerSource, MaxWatchStreamsPerSource and MaxTrackedKeys must not be negative"))
	}
	if l.MaxTrackedKeys == 0 {
		l.MaxTrackedKeys = DefaultMaxTrackedKeys
	}
	return l, errors.Join(errs...)
}

// limiter applies Limits on the shared request path, the watch streams
// and the listener.
type limiter struct {
	opts      Limits
	sources   *keyedLimiter // nil when off
	ids       *keyedLimiter // nil when off
	conns     *counter      // nil when off
	watches   *counter      // nil when off
	limited   *prometheus.CounterVec
	connsOpen prometheus.Gauge
	refused   *prometheus.CounterVec
}

func newLimiter(opts Limits, reg prometheus.Registerer, clk clock.PassiveClock) (*limiter, error) {
	opts, err := opts.complete()
	if err != nil {
		return nil, err
	}
	l := &limiter{
		opts: opts,
		limited: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_rate_limited_requests_total",
			Help: "Certificate requests refused by a rate limit, by limit: source or identity.",
		}, []string{"limit"}),
		connsOpen: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_connections_open",
			Help: "Connections open on the gRPC listener, when it bounds connections per source.",
		}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_limit_refused_total",
			Help: "Connections and bundle watch streams refused by a per-source bound, by what: connection or watch_stream.",
		}, []string{"what"}),
	}
	evicted := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshca_rate_limit_evictions_total",
		Help: "Rate limit buckets dropped before they were idle, because MaxTrackedKeys were tracked, by limit.",
	}, []string{"limit"})
	cols := []prometheus.Collector{l.limited, l.connsOpen, l.refused, evicted}
	for _, k := range []struct {
		name string
		r    Rate
		dst  **keyedLimiter
	}{{"source", opts.PerSource, &l.sources}, {"identity", opts.PerIdentity, &l.ids}} {
		if k.r.PerSecond == 0 {
			continue
		}
		kl := newKeyedLimiter(k.r, opts.MaxTrackedKeys, clk.Now)
		kl.evicted = evicted.WithLabelValues(k.name)
		*k.dst = kl
		cols = append(cols, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "meshca_rate_limit_tracked_keys",
			Help:        "Sources or identities a rate limit keeps a bucket for, by limit.",
			ConstLabels: prometheus.Labels{"limit": k.name},
		}, func() float64 { return float64(kl.len()) }))
	}
	if opts.MaxConnectionsPerSource > 0 {
		l.conns = newCounter(opts.MaxConnectionsPerSource)
	}
	if opts.MaxWatchStreamsPerSource > 0 {
		l.watches = newCounter(opts.MaxWatchStreamsPerSource)
	}
	for _, c := range cols {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("server: registering limit metrics: %w", err)
		}
	}
	return l, nil
}

// allowSource takes a token of the caller's source, before
// authentication. Its error is a *limitError.
func (l *limiter) allowSource(ctx context.Context) error {
	if l.sources == nil {
		return nil
	}
	src := sourceOf(peerAddr(ctx))
	if wait := l.sources.take(src); wait > 0 {
		l.limited.WithLabelValues("source").Inc()
		r := l.opts.PerSource
		return &limitError{retryAfter: wait, msg: fmt.Sprintf(
			"rate limited: source %s sent more than %s certificate requests a second (burst %d); retry in %s",
			src, formatRate(r.PerSecond), r.Burst, roundUp(wait))}
	}
	return nil
}

// allowIdentity takes a token of an authenticated identity, on every API
// together. Its error is a *limitError.
func (l *limiter) allowIdentity(id spiffeid.ID) error {
	if l.ids == nil || id.IsZero() {
		return nil
	}
	if wait := l.ids.take(id.String()); wait > 0 {
		l.limited.WithLabelValues("identity").Inc()
		r := l.opts.PerIdentity
		return &limitError{retryAfter: wait, msg: fmt.Sprintf(
			"rate limited: identity %s asked for more than %s certificates a second (burst %d) across all APIs; retry in %s",
			id, formatRate(r.PerSecond), r.Burst, roundUp(wait))}
	}
	return nil
}

// streamInterceptor bounds the bundle watch streams of one source.
func (l *limiter) streamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if l.watches == nil || info.FullMethod != meshcav1.BundleService_WatchBundle_FullMethodName {
		return handler(srv, ss)
	}
	src := sourceOf(peerAddr(ss.Context()))
	if !l.watches.acquire(src) {
		l.refused.WithLabelValues("watch_stream").Inc()
		return status.Errorf(codes.ResourceExhausted,
			"too many bundle watch streams from source %s (at most %d); close the ones not in use, one stream per agent is enough", src, l.opts.MaxWatchStreamsPerSource)
	}
	defer l.watches.release(src)
	return handler(srv, ss)
}

// limitError is a request refused by a rate limit: the caller may try
// again after retryAfter. Its message names the source or identity, never
// a credential.
type limitError struct {
	msg        string
	retryAfter time.Duration
}

func (e *limitError) Error() string { return "server: " + e.msg }

// status is ResourceExhausted with a google.rpc.RetryInfo detail.
func (e *limitError) status() *status.Status {
	return retryStatus(codes.ResourceExhausted, e.Error(), e.retryAfter)
}

// retryStatus returns a status of code with msg and, when after is
// positive, a google.rpc.RetryInfo detail telling the caller when to try
// again: the shape of every "come back later" refusal of the server.
func retryStatus(code codes.Code, msg string, after time.Duration) *status.Status {
	st := status.New(code, msg)
	if after <= 0 {
		return st
	}
	withInfo, err := st.WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(roundUp(after))})
	if err != nil {
		return st
	}
	return withInfo
}

// roundUp rounds d up to the millisecond, so that a hint is never early.
func roundUp(d time.Duration) time.Duration {
	return (d + time.Millisecond - 1).Truncate(time.Millisecond)
}

func formatRate(r float64) string {
	return fmt.Sprintf("%.4g", r)
}

// peerAddr is the caller's address, nil when unknown.
func peerAddr(ctx context.Context) net.Addr {
	if p, ok := peer.FromContext(ctx); ok {
		return p.Addr
	}
	return nil
}

// sourceOf returns the source key of addr: its IP, or for IPv6 its /64
// prefix; the address itself when it has no IP.
func sourceOf(addr net.Addr) string {
	if addr == nil {
		return "unknown"
	}
	var ip netip.Addr
	switch a := addr.(type) {
	case *net.TCPAddr:
		ip, _ = netip.AddrFromSlice(a.IP)
	default:
		ap, err := netip.ParseAddrPort(addr.String())
		if err != nil {
			return addr.String()
		}
		ip = ap.Addr()
	}
	ip = ip.Unmap()
	switch {
	case !ip.IsValid():
		return addr.String()
	case ip.Is4():
		return ip.String()
	}
	p, _ := ip.Prefix(64)
	return p.String()
}

// keyedLimiter is a token bucket per key, bounded in memory: buckets are
// kept in least-recently-used order; one idle long enough to be full again
// is dropped, as a new bucket would be the same; past max keys, the least
// recently used is dropped.
type keyedLimiter struct {
	limit   rate.Limit
	burst   int
	refill  time.Duration // time for an empty bucket to fill
	max     int
	now     func() time.Time
	evicted prometheus.Counter // nil counts nowhere

	mu   sync.Mutex
	keys map[string]*list.Element
	lru  list.List // of *bucket, most recent first
}

type bucket struct {
	key  string
	lim  *rate.Limiter
	last time.Time
}

func newKeyedLimiter(r Rate, maxKeys int, now func() time.Time) *keyedLimiter {
	refill := time.Duration(float64(r.Burst) / r.PerSecond * float64(time.Second))
	if refill <= 0 || float64(r.Burst)/r.PerSecond > float64(math.MaxInt64/time.Second) {
		refill = math.MaxInt64
	}
	return &keyedLimiter{
		limit:  rate.Limit(r.PerSecond),
		burst:  r.Burst,
		refill: refill,
		max:    maxKeys,
		now:    now,
		keys:   make(map[string]*list.Element),
	}
}

// take takes a token of key's bucket. It returns zero when there was one,
// else how long until there is one (and takes nothing).
func (k *keyedLimiter) take(key string) time.Duration {
	now := k.now()
	k.mu.Lock()
	defer k.mu.Unlock()
	k.dropIdle(now)
	var b *bucket
	if e, ok := k.keys[key]; ok {
		b = e.Value.(*bucket)
		k.lru.MoveToFront(e)
	} else {
		if len(k.keys) >= k.max {
			oldest := k.lru.Back()
			delete(k.keys, oldest.Value.(*bucket).key)
			k.lru.Remove(oldest)
			if k.evicted != nil {
				k.evicted.Inc()
			}
		}
		b = &bucket{key: key, lim: rate.NewLimiter(k.limit, k.burst)}
		k.keys[key] = k.lru.PushFront(b)
	}
	b.last = now
	r := b.lim.ReserveN(now, 1)
	if !r.OK() {
		return k.refill
	}
	if wait := r.DelayFrom(now); wait > 0 {
		r.CancelAt(now)
		return wait
	}
	return 0
}

// dropIdle drops the buckets, least recent first, unused for long enough
// to be full again.
func (k *keyedLimiter) dropIdle(now time.Time) {
	for e := k.lru.Back(); e != nil; e = k.lru.Back() {
		b := e.Value.(*bucket)
		if now.Sub(b.last) < k.refill {
			return
		}
		delete(k.keys, b.key)
		k.lru.Remove(e)
	}
}

func (k *keyedLimiter) len() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.keys)
}

// counter counts what is open per key, up to max each.
type counter struct {
	max  int
	mu   sync.Mutex
	open map[string]int
}

func newCounter(maxPerKey int) *counter {
	return &counter{max: maxPerKey, open: make(map[string]int)}
}

// acquire counts one more for key, unless key is at the bound.
func (c *counter) acquire(key string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.open[key] >= c.max {
		return false
	}
	c.open[key]++
	return true
}

func (c *counter) release(key string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.open[key] <= 1 {
		delete(c.open, key)
		return
	}
	c.open[key]--
}
