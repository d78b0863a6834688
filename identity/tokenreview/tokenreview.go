package tokenreview

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	authenticationv1 "k8s.io/api/authentication/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	authenticationv1client "k8s.io/client-go/kubernetes/typed/authentication/v1"
	"k8s.io/utils/clock"

	"github.com/meshca/meshca/identity"
)

// The defaults of Options.
const (
	DefaultTimeout         = 5 * time.Second
	DefaultCacheTTL        = time.Minute
	DefaultMaxCacheEntries = 100_000
	DefaultMaxInFlight     = 64
)

// ReasonOverloaded is the reason of the *identity.AuthError refusing a
// token that would start a review while Options.MaxInFlight are under
// way: the caller may retry later (gRPC ResourceExhausted).
const ReasonOverloaded = identity.ReasonOverloaded

// serviceAccountPrefix starts the user name the API server gives a
// service account: system:serviceaccount:<namespace>:<name>.
const serviceAccountPrefix = "system:serviceaccount:"

// maxStatusError is the most of a TokenReview's status.error quoted in an
// error message.
const maxStatusError = 512

// Options configure an Authenticator.
type Options struct {
	// TrustDomain of the IDs issued. Required.
	TrustDomain spiffeid.TrustDomain

	// Audiences a token must be valid for, at least one of them, when
	// the credential names none (identity.Credential.Audiences): the
	// audience of the projected service-account token the workloads
	// present to the native API, such as "meshca". Required: a token
	// without an audience is one for the API server, and a CA that
	// accepted those could be handed any token a workload uses to talk
	// to Kubernetes.
	Audiences []string

	// Timeout bounds one review, from the request to the API server's
	// answer. Zero means DefaultTimeout (5s).
	Timeout time.Duration

	// CacheTTL is the longest an accepted review is reused without asking
	// the API server again; an entry also ends at the token's expiry.
	// It bounds how long a token stays accepted after its pod or service
	// account is deleted. Zero means DefaultCacheTTL (1m); negative turns
	// the cache off.
	CacheTTL time.Duration

	// MaxCacheEntries bounds the cache; the least recently used entry is
	// evicted first. Zero means DefaultMaxCacheEntries (100,000, a few
	// tens of MB at most).
	MaxCacheEntries int

	// MaxInFlight bounds the reviews under way at once, across all
	// tokens. A token that would start one more is refused at once with
	// an *identity.AuthError of reason ReasonOverloaded; a caller
	// presenting a token already under review joins that review and is
	// never refused for it. The bound keeps a flood of made-up tokens
	// from piling up requests to the API server and goroutines here.
	// Zero means DefaultMaxInFlight (64); it must not be negative.
	MaxInFlight int

	// Clock tells the time for cache expiry and for the expiry of
	// tokens. Nil means the real clock.
	Clock clock.PassiveClock

	// Logger receives refusals (debug) and API server failures (warn),
	// which never hold the token. Nil means no logging.
	Logger *slog.Logger

	// Registerer, when not nil, receives the metrics of reviews and of
	// the cache. Two Authenticators cannot share one.
	Registerer prometheus.Registerer
}

// Authenticator authenticates Kubernetes service-account tokens with
// TokenReviews. It is safe for concurrent use.
type Authenticator struct {
	reviews     authenticationv1client.TokenReviewsGetter
	trustDomain spiffeid.TrustDomain
	audiences   []string
	timeout     time.Duration
	cacheTTL    time.Duration
	maxInFlight int
	clock       clock.PassiveClock
	log         *slog.Logger
	metrics     *metrics

	mu       sync.Mutex
	cache    *cache                // guarded by mu
	inflight map[tokenHash]*flight // guarded by mu
	// reviewing counts the reviews under way, at most maxInFlight: those
	// of the flights in inflight, and those of flights cancelled but not
	// yet landed, whose request to the API server is still ending.
	reviewing int // guarded by mu

	// joined, when set by a test, is called when a caller joins a review
	// under way.
	joined func()
}

// flight is one review under way, shared by every caller presenting the
// same token meanwhile. caller and err are set before done is closed.
//
// The callers waiting for it are counted: when the last one leaves before
// it lands, it is cancelled and leaves inflight, so that no review goes on
// for nobody, and the next caller with the token starts a new one.
type flight struct {
	done    chan struct{}
	cancel  context.CancelFunc
	waiters int // guarded by Authenticator.mu
	caller  identity.Caller
	err     error
}

var _ identity.Authenticator = (*Authenticator)(nil)

// New returns an Authenticator sending TokenReviews through client, such
// as a clientset's AuthenticationV1().
func New(client authenticationv1client.TokenReviewsGetter, opts Options) (*Authenticator, error) {
	if client == nil {
		return nil, errors.New("tokenreview: a TokenReviews client is required")
	}
	if opts.TrustDomain.IsZero() {
		return nil, errors.New("tokenreview: Options.TrustDomain is required")
	}
	if len(opts.Audiences) == 0 {
		return nil, errors.New("tokenreview: Options.Audiences is required: the audience of the workloads' projected service-account tokens, such as \"meshca\"")
	}
	if slices.Contains(opts.Audiences, "") {
		return nil, errors.New("tokenreview: Options.Audiences has an empty audience")
	}
	if opts.Timeout < 0 {
		return nil, fmt.Errorf("tokenreview: Options.Timeout is %s; it must be positive, or zero for %s", opts.Timeout, DefaultTimeout)
	}
	if opts.MaxCacheEntries < 0 {
		return nil, fmt.Errorf("tokenreview: Options.MaxCacheEntries is %d; it must be positive, or zero for %d", opts.MaxCacheEntries, DefaultMaxCacheEntries)
	}
	if opts.MaxInFlight < 0 {
		return nil, fmt.Errorf("tokenreview: Options.MaxInFlight is %d; it must be positive, or zero for %d", opts.MaxInFlight, DefaultMaxInFlight)
	}
	a := &Authenticator{
		reviews:     client,
		trustDomain: opts.TrustDomain,
		audiences:   slices.Clone(opts.Audiences),
		timeout:     opts.Timeout,
		cacheTTL:    opts.CacheTTL,
		maxInFlight: opts.MaxInFlight,
		clock:       opts.Clock,
		log:         opts.Logger,
		inflight:    make(map[tokenHash]*flight),
	}
	if a.timeout == 0 {
		a.timeout = DefaultTimeout
	}
	if a.cacheTTL == 0 {
		a.cacheTTL = DefaultCacheTTL
	}
	if a.maxInFlight == 0 {
		a.maxInFlight = DefaultMaxInFlight
	}
	entries := opts.MaxCacheEntries
	if entries == 0 {
		entries = DefaultMaxCacheEntries
	}
	if a.cacheTTL < 0 {
		entries = 0
	}
	a.cache = newCache(entries)
	if a.clock == nil {
		a.clock = clock.RealClock{}
	}
	if a.log == nil {
		a.log = slog.New(slog.DiscardHandler)
	}
	m, err := newMetrics(opts.Registerer, func() float64 {
		a.mu.Lock()
		defer a.mu.Unlock()
		return float64(a.cache.len())
	}, func() float64 {
		a.mu.Lock()
		defer a.mu.Unlock()
		return float64(a.reviewing)
	})
	if err != nil {
		return nil, fmt.Errorf("tokenreview: registering metrics: %w", err)
	}
	a.metrics = m
	return a, nil
}

// Authenticate accepts a service-account token that the API server
// authenticates for one of the audiences, as the workload ID of its
// namespace and service account. The audiences are cred.Audiences when it
// names any, else Options.Audiences; reviews are cached, and shared
// between concurrent callers, by token and audiences, so that a token
// accepted for one set of audiences is never taken from the cache for
// another.
//
// It returns identity.ErrNotApplicable when there is no token, and an
// *identity.AuthError with reason identity.ReasonUnknownToken when the
// token is not a JWT, has expired by its own "exp" claim, or is refused,
// so that an identity.Chain tries the next authenticator; with reason
// identity.ReasonUnavailable when the API server cannot be asked within
// the timeout; and with reason ReasonOverloaded when the token would start
// a review while Options.MaxInFlight are under way. When ctx ends first,
// the error wraps ctx.Err().
func (a *Authenticator) Authenticate(ctx context.Context, cred identity.Credential) (identity.Caller, error) {
	if cred.Token == "" {
		return identity.Caller{}, identity.ErrNotApplicable
	}
	exp, hasExp, ok := parseJWT(cred.Token)
	if !ok {
		return identity.Caller{}, authError(identity.ReasonUnknownToken, nil, "bearer token is not a Kubernetes service-account token: it is not a JWT")
	}
	audiences := a.audiences
	if len(cred.Audiences) > 0 {
		audiences = cred.Audiences
	}
	subject := subjectOf(cred.Token)
	key := reviewKey(cred.Token, audiences)
	// The claim is not verified, but a token that lies about it gains
	// nothing: the API server refuses an expired token too. Refusing here
	// spares the review; a cache entry never outlives the claim either.
	if now := a.clock.Now(); hasExp && !now.Before(exp) {
		err := authError(identity.ReasonUnknownToken, nil, "service-account token expired at %s, by its exp claim; present a current token", exp.UTC().Format(time.RFC3339))
		a.log.LogAttrs(ctx, slog.LevelDebug, "token refused without a review",
			slog.String("subject", subject), slog.Any("error", err))
		return identity.Caller{}, err
	}

	// The cache and the flights are looked at under one lock, and a
	// flight caches its result before it leaves the map: a caller finds
	// the flight or its result, and one token is never reviewed twice at
	// once, unless a review its callers all left is still ending.
	a.mu.Lock()
	if caller, ok := a.cache.get(key, a.clock.Now()); ok {
		a.mu.Unlock()
		a.metrics.cacheHits.Inc()
		return caller, nil
	}
	// A caller that has already given up starts or joins nothing.
	if err := ctx.Err(); err != nil {
		a.mu.Unlock()
		return identity.Caller{}, fmt.Errorf("tokenreview: waiting for the review of the token: %w", err)
	}
	f, ok := a.inflight[key]
	if !ok {
		if a.reviewing >= a.maxInFlight {
			a.mu.Unlock()
			a.metrics.overloaded.Inc()
			err := authError(ReasonOverloaded, nil, "too many service-account tokens under review (%d at once); retry later", a.maxInFlight)
			a.log.LogAttrs(ctx, slog.LevelDebug, "token refused without a review",
				slog.String("subject", subject), slog.Any("error", err))
			return identity.Caller{}, err
		}
		a.reviewing++
		// The review keeps the values of the context of the caller that
		// starts it, not its end: others may join it. It ends at the
		// timeout, or when every caller waiting for it has left.
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), a.timeout)
		f = &flight{done: make(chan struct{}), cancel: cancel}
		a.inflight[key] = f
		go a.fly(fctx, f, key, review{token: cred.Token, audiences: slices.Clone(audiences), subject: subject}, exp, hasExp)
	} else if a.joined != nil {
		a.joined()
	}
	f.waiters++
	a.mu.Unlock()

	// Waiting is bounded here too, so that a client that does not honour
	// its context cannot hold the caller.
	wait, cancel := context.WithTimeout(ctx, a.timeout)
	defer cancel()
	select {
	case <-f.done:
		return f.caller, f.err
	case <-wait.Done():
		a.leave(f, key)
		if err := ctx.Err(); err != nil {
			return identity.Caller{}, fmt.Errorf("tokenreview: waiting for the review of the token: %w", err)
		}
		return identity.Caller{}, authError(identity.ReasonUnavailable, context.DeadlineExceeded, "cannot reach the Kubernetes API server to review the token: no answer within %s", a.timeout)
	}
}

// leave takes a caller that stopped waiting off flight f of key. The last
// one to leave cancels the review, and takes the flight out of inflight
// so that the next caller starts a new review rather than joining one
// that is ending.
func (a *Authenticator) leave(f *flight, key tokenHash) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if f.waiters--; f.waiters > 0 {
		return
	}
	f.cancel()
	if a.inflight[key] == f {
		delete(a.inflight, key)
	}
}

// review is what a flight asks the API server: a token, the audiences it
// must be valid for, and the subject naming the token in logs.
type review struct {
	token     string
	audiences []string
	subject   string
}

// fly reviews a token for a flight, caches an accepted review, and lands
// the flight, freeing its place among the reviews under way.
func (a *Authenticator) fly(ctx context.Context, f *flight, key tokenHash, r review, exp time.Time, hasExp bool) {
	defer f.cancel()
	start := a.clock.Now()
	f.caller, f.err = a.review(ctx, r)

	a.mu.Lock()
	if f.err == nil {
		expires := start.Add(a.cacheTTL)
		if hasExp && exp.Before(expires) {
			expires = exp
		}
		// A token already expired by its own claim, yet accepted (the
		// clock moved since Authenticate looked), is not cached.
		if expires.After(start) {
			a.cache.add(key, f.caller, expires)
		}
	}
	if a.inflight[key] == f {
		delete(a.inflight, key)
	}
	a.reviewing--
	a.mu.Unlock()
	close(f.done)
}

// subjectOf names a token in errors and logs by a prefix of its SHA-256,
// as the static bootstrap tokens do.
func subjectOf(token string) string {
	h := sha256.Sum256([]byte(token))
	return "token-sha256:" + hex.EncodeToString(h[:4])
}

// reviewKey is what a review is cached and shared under: the SHA-256 of
// the token and the audiences it is reviewed for, each prefixed by its
// length so that no two pairs encode alike.
func reviewKey(token string, audiences []string) tokenHash {
	h := sha256.New()
	var n [4]byte
	for _, s := range append([]string{token}, audiences...) {
		binary.BigEndian.PutUint32(n[:], uint32(len(s)))
		h.Write(n[:])
		h.Write([]byte(s))
	}
	var key tokenHash
	h.Sum(key[:0])
	return key
}

// review asks the API server about r.token.
func (a *Authenticator) review(ctx context.Context, r review) (identity.Caller, error) {
	token, subject := r.token, r.subject
	req := &authenticationv1.TokenReview{Spec: authenticationv1.TokenReviewSpec{
		Token:     token,
		Audiences: slices.Clone(r.audiences),
	}}
	res, err := a.reviews.TokenReviews().Create(ctx, req, metav1.CreateOptions{})
	if err == nil && res == nil {
		err = errors.New("empty TokenReview response")
	}
	if err != nil && cancelledEarly(ctx) {
		// Every caller waiting for the review left: nobody reads the
		// error, and a flood of callers that give up is no API server
		// failure worth a warning.
		a.metrics.reviews.WithLabelValues(resultCancelled).Inc()
		a.log.LogAttrs(ctx, slog.LevelDebug, "token review cancelled: its callers left",
			slog.String("subject", subject))
		return identity.Caller{}, authError(identity.ReasonUnavailable, context.Canceled, "review of the token cancelled: its callers left")
	}
	if err != nil {
		a.metrics.reviews.WithLabelValues(resultUnavailable).Inc()
		// A context ended otherwise is past its deadline, whether the
		// deadline or a caller giving up at the same time ended it.
		forbidden, timedOut := apierrors.IsForbidden(err), errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil
		err = redactError(err, token)
		a.log.LogAttrs(ctx, slog.LevelWarn, "token review failed",
			slog.String("subject", subject), slog.Any("error", err))
		switch {
		case forbidden:
			return identity.Caller{}, authError(identity.ReasonUnavailable, err, "the Kubernetes API server does not let meshca review tokens (its service account needs create on tokenreviews.authentication.k8s.io)")
		case timedOut:
			return identity.Caller{}, authError(identity.ReasonUnavailable, err, "cannot reach the Kubernetes API server to review the token: no answer within %s", a.timeout)
		}
		return identity.Caller{}, authError(identity.ReasonUnavailable, err, "cannot reach the Kubernetes API server to review the token")
	}

	caller, err := a.accept(res.Status, r)
	if err != nil {
		a.metrics.reviews.WithLabelValues(resultRefused).Inc()
		a.log.LogAttrs(ctx, slog.LevelDebug, "token review refused",
			slog.String("subject", subject), slog.Any("error", err))
		return identity.Caller{}, err
	}
	a.metrics.reviews.WithLabelValues(resultAccepted).Inc()
	return caller, nil
}

// cancelledEarly reports whether the context of a review was cancelled,
// by its callers leaving, before its deadline. A caller that gives up
// because its own wait, as long as the review's, has run out leaves after
// the review's deadline: that review timed out, and counts as such.
func cancelledEarly(ctx context.Context) bool {
	deadline, ok := ctx.Deadline()
	return errors.Is(ctx.Err(), context.Canceled) && ok && time.Now().Before(deadline)
}

// accept turns the status of a review into the caller it authenticates.
func (a *Authenticator) accept(st authenticationv1.TokenReviewStatus, r review) (identity.Caller, error) {
	if !st.Authenticated {
		if msg := truncate(redact(st.Error, r.token), maxStatusError); msg != "" {
			return identity.Caller{}, authError(identity.ReasonUnknownToken, nil, "service-account token refused by the API server for audiences %q: %s", r.audiences, msg)
		}
		return identity.Caller{}, authError(identity.ReasonUnknownToken, nil, "service-account token refused by the API server for audiences %q", r.audiences)
	}
	// An API server that ignores spec.audiences answers with none, and
	// one that checked them answers with those the token is valid for:
	// only the second proves the token was made for this CA.
	if !slices.ContainsFunc(st.Audiences, func(aud string) bool { return slices.Contains(r.audiences, aud) }) {
		return identity.Caller{}, authError(identity.ReasonUnknownToken, nil, "token is valid for audiences %q, none of %q; present a projected service-account token with one of them", st.Audiences, r.audiences)
	}
	ns, sa, err := splitServiceAccount(st.User.Username)
	if err != nil {
		return identity.Caller{}, err
	}
	id, err := identity.WorkloadID(a.trustDomain, ns, sa)
	if err != nil {
		return identity.Caller{}, authError(identity.ReasonUnknownToken, err, "service account %s/%s has no SPIFFE ID", ns, sa)
	}
	return identity.Caller{
		ID:      id,
		Method:  identity.MethodKubernetesToken,
		Subject: "sa:" + ns + "/" + sa + " " + r.subject,
	}, nil
}

// splitServiceAccount returns the namespace and name of a service
// account's user name, system:serviceaccount:<namespace>:<name>.
func splitServiceAccount(username string) (namespace, name string, err error) {
	rest, ok := strings.CutPrefix(username, serviceAccountPrefix)
	if !ok {
		return "", "", authError(identity.ReasonUnknownToken, nil, "token authenticates user %q, not a service account; present a service-account token", username)
	}
	namespace, name, ok = strings.Cut(rest, ":")
	if !ok || len(validation.IsDNS1123Label(namespace)) > 0 || len(validation.IsDNS1123Subdomain(name)) > 0 {
		return "", "", authError(identity.ReasonUnknownToken, nil, "token authenticates %q, which is not %s<namespace>:<name> with a valid namespace and name", username, serviceAccountPrefix)
	}
	return namespace, name, nil
}

// redact removes the token, and any of its segments, from a message of
// the API server: one that quotes what it was sent must not carry the
// token into errors and logs.
func redact(msg, token string) string {
	msg = strings.ReplaceAll(msg, token, "<token>")
	for seg := range strings.SplitSeq(token, ".") {
		if len(seg) >= 8 {
			msg = strings.ReplaceAll(msg, seg, "<token>")
		}
	}
	return msg
}

// truncate bounds msg to n bytes, cut at a character boundary.
func truncate(msg string, n int) string {
	if len(msg) <= n {
		return msg
	}
	return strings.ToValidUTF8(msg[:n], "") + "..."
}

// redactError returns err, or when its message holds a part of the token,
// an error with that part removed. The redacted error wraps nothing: what
// err wrapped would still print the token.
func redactError(err error, token string) error {
	msg := err.Error()
	if r := redact(msg, token); r != msg {
		return errors.New(r)
	}
	return err
}
