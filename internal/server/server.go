package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	securityv1alpha1 "istio.io/api/security/v1alpha1"
	"k8s.io/utils/clock"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	linkerdpb "github.com/meshca/meshca/proto/linkerd/identity"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
)

// MaxRequestBytes is the default largest gRPC message the server reads.
// Larger requests are refused by the transport before they are parsed.
const MaxRequestBytes = 64 << 10

// maxHeaderBytes bounds a request's metadata.
const maxHeaderBytes = 16 << 10

// maxStreamsPerConn bounds the concurrent streams of one connection.
const maxStreamsPerConn = 100

// streamWorkersPerCPU sizes gRPC's pool of request goroutines: enough
// that requests waiting for admission, a token review or the network do
// not push the rest onto new goroutines, whose stacks grow again.
const streamWorkersPerCPU = 16

// readBufferBytes is the read buffer of each client connection.
const readBufferBytes = 4 << 10

// DefaultRefreshHint is how often bundle consumers are told to check for a
// new bundle.
const DefaultRefreshHint = 5 * time.Minute

// Options configure a Server.
type Options struct {
	// CA signs. Required.
	CA *ca.CA

	// Authenticator authenticates callers of every front end. Required.
	Authenticator identity.Authenticator

	// Policy authorises identities. Its TrustDomain defaults to the CA's.
	Policy identity.Policy

	// Logger receives operational logs; nil discards them.
	Logger *slog.Logger

	// AuditLogger receives one line for every certificate issued or
	// refused, whatever the operational log level; nil means Logger.
	AuditLogger *slog.Logger

	// Registerer receives the server's metrics; nil registers nowhere.
	Registerer prometheus.Registerer

	// RefreshHint is the bundle refresh hint; zero means
	// DefaultRefreshHint.
	RefreshHint time.Duration

	// MaxRequestBytes bounds a request message; zero means
	// MaxRequestBytes.
	MaxRequestBytes int

	// Observer, when set, is told the bundle sequence each caller reported
	// holding on every certificate issued (rotation.Tracker).
	Observer Observer

	// Federated, when set, gives the bundles of federated trust domains,
	// sent in every Sign response and on the bundle stream
	// (*federation.Federator). Nil sends none.
	Federated FederatedBundles

	// Istio configures Istio's CA API, istio.v1.auth.IstioCertificateService.
	// The zero value leaves it off.
	Istio IstioOptions

	// Linkerd configures Linkerd's identity API,
	// io.linkerd.proxy.identity.Identity. The zero value leaves it off.
	Linkerd LinkerdOptions

	// Limits bound what one source or one identity may ask: rate limits
	// on every API, connections (with LimitListener) and bundle watch
	// streams. The zero value bounds none of them.
	Limits Limits

	// Bans, when set, are the emergency bans (*ban.Registry): no front end
	// issues for a banned identity, nor to a banned caller. Nil bans none.
	Bans BanList

	// Admission bounds the signing work in flight over every API, queues
	// what cannot start at once with first certificates ahead of
	// renewals, and sheds what would wait too long. The zero value is on,
	// with its defaults.
	Admission Admission

	// Clock times admission's waits and hold times, and the rate limits'
	// buckets. Default the real clock.
	Clock clock.Clock
}

// Observer learns which bundle sequence each workload holds.
type Observer interface {
	Observe(id spiffeid.ID, bundleSequence uint64)
}

// Server holds the shared request path and the gRPC services of meshca.
type Server struct {
	ca       *ca.CA
	authn    identity.Authenticator
	policy   identity.Policy
	log      *slog.Logger
	audit    *slog.Logger
	metrics  *metrics
	hint     time.Duration
	maxBytes int
	bundles  bundleCache
	fedCache federatedCache
	health   *health.Server
	observer Observer
	istio    IstioOptions
	linkerd  LinkerdOptions
	limits   *limiter
	bans     BanList
	admit    *admission
	// handshakes bounds TLS handshakes on LimitListener's listeners.
	handshakes *handshakeGate

	stopOnce sync.Once
	stopping chan struct{} // closed by Shutdown
}

// New returns a Server.
func New(opts Options) (*Server, error) {
	if opts.CA == nil || opts.Authenticator == nil {
		return nil, errors.New("server: a CA and an Authenticator are required")
	}
	if opts.Policy.TrustDomain.IsZero() {
		opts.Policy.TrustDomain = opts.CA.TrustDomain()
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.AuditLogger == nil {
		opts.AuditLogger = opts.Logger
	}
	if opts.Registerer == nil {
		opts.Registerer = prometheus.NewRegistry()
	}
	if opts.RefreshHint <= 0 {
		opts.RefreshHint = DefaultRefreshHint
	}
	if opts.MaxRequestBytes <= 0 {
		opts.MaxRequestBytes = MaxRequestBytes
	}
	istio, err := opts.Istio.complete()
	if err != nil {
		return nil, err
	}
	linkerd, err := opts.Linkerd.complete()
	if err != nil {
		return nil, err
	}
	m, err := newMetrics(opts.Registerer, opts.CA)
	if err != nil {
		return nil, fmt.Errorf("server: registering metrics: %w", err)
	}
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
	}
	limits, err := newLimiter(opts.Limits, opts.Registerer, opts.Clock)
	if err != nil {
		return nil, err
	}
	admit, err := newAdmission(opts.Admission, opts.Registerer, opts.Clock)
	if err != nil {
		return nil, err
	}
	handshakes, err := newHandshakeGate(opts.Admission.MaxHandshakes, opts.Registerer)
	if err != nil {
		return nil, err
	}
	return &Server{
		ca:       opts.CA,
		authn:    opts.Authenticator,
		policy:   opts.Policy,
		log:      opts.Logger,
		audit:    opts.AuditLogger.With(slog.Bool("audit", true)),
		metrics:  m,
		hint:     opts.RefreshHint,
		maxBytes: opts.MaxRequestBytes,
		health:   health.NewServer(),
		stopping: make(chan struct{}),
		observer: opts.Observer,
		fedCache: federatedCache{src: opts.Federated},
		istio:    istio,
		linkerd:  linkerd,
		limits:   limits,
		bans:     opts.Bans,
		admit:    admit,

		handshakes: handshakes,
	}, nil
}

// GRPCServer returns a gRPC server with meshca's services (the native
// certificate and bundle APIs, and Istio's and Linkerd's when enabled) and
// gRPC health registered, serving TLS with tlsConfig. The TLS config
// should request, not require, client certificates: callers that
// authenticate with a token have none, and a renewing caller's certificate
// is verified by the authenticator, which gives a clear gRPC error instead
// of a failed handshake.
func (s *Server) GRPCServer(tlsConfig *tls.Config, opts ...grpc.ServerOption) *grpc.Server {
	opts = append([]grpc.ServerOption{
		// The credentials tell LimitListener when a handshake is over,
		// and a handshake that takes longer than handshakeTimeout ends.
		grpc.Creds(gatedCreds{TransportCredentials: credentials.NewTLS(tlsConfig)}),
		grpc.ConnectionTimeout(handshakeTimeout),
		grpc.MaxRecvMsgSize(s.maxBytes),
		// Headers carry the bearer token (8 KiB at most) and little else.
		grpc.MaxHeaderListSize(maxHeaderBytes),
		// One caller holds few streams (a bundle watch, a Sign or two):
		// bound them, so that watchers cannot pile up on one connection.
		grpc.MaxConcurrentStreams(maxStreamsPerConn),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.ChainStreamInterceptor(s.limits.streamInterceptor),
		// Serve requests on a pool of goroutines whose stacks have grown
		// to what a request needs, rather than a new goroutine per
		// request growing its stack from 8 KiB every time (copystack was
		// 6 % of the CPU at full load). Beyond the pool (bundle watches
		// hold their goroutine), gRPC starts goroutines as before.
		grpc.NumStreamWorkers(uint32(streamWorkersPerCPU * runtime.GOMAXPROCS(0))),
		// Memory per connected client: a connection reads through a
		// small buffer (requests are about a kilobyte; TLS buffers a
		// whole record below it anyway). gRPC's 32 KiB default read
		// buffer was 40 % of the server's memory with thousands of
		// agents connected. (An idle connection's write buffer goes back
		// to a shared pool by default.)
		grpc.ReadBufferSize(readBufferBytes),
	}, opts...)
	g := grpc.NewServer(opts...)
	meshcav1.RegisterCertificateServiceServer(g, &certificateService{s: s})
	meshcav1.RegisterBundleServiceServer(g, &bundleService{s: s})
	if s.istio.Enabled {
		securityv1alpha1.RegisterIstioCertificateServiceServer(g, &istioService{s: s})
	}
	if s.linkerd.Enabled {
		linkerdpb.RegisterIdentityServer(g, &linkerdService{s: s})
	}
	healthpb.RegisterHealthServer(g, s.health)
	return g
}

// HealthServer returns a plain-text gRPC server with only the health
// service, sharing the TLS server's status: for kubelet gRPC probes, which
// cannot speak TLS. It exposes nothing else.
func (s *Server) HealthServer() *grpc.Server {
	g := grpc.NewServer(grpc.MaxRecvMsgSize(1 << 10))
	healthpb.RegisterHealthServer(g, s.health)
	return g
}

// Shutdown readies the server to stop: health reports NOT_SERVING, so
// balancers move callers away, and bundle watch streams end with
// Unavailable, so that a graceful stop does not wait for callers that
// would watch forever. Unary requests in flight are not touched.
func (s *Server) Shutdown() {
	s.stopOnce.Do(func() {
		s.health.Shutdown()
		close(s.stopping)
	})
}

// issueRequest is a front end's request translated to the shared path.
// Front ends differ only in what they fill in here; authentication,
// authorisation, signing, metrics and audit are the same for all.
type issueRequest struct {
	// api labels metrics and audit lines: APINative, APIIstio, APILinkerd.
	api string

	// csr is the request's CSR, read by form (nil means svidForm{}).
	csr  []byte
	form csrForm

	// ttl is the lifetime asked for; zero means the CA's default.
	ttl time.Duration

	// bundleSequence is the bundle the caller holds, 0 when unknown.
	bundleSequence uint64

	// credential reads the caller's credential; nil means the request's
	// metadata and TLS client certificate (credentialFrom). Linkerd's
	// token is in the request's body.
	credential func(context.Context) (identity.Credential, error)

	// audiences are those a token must be valid for, set on the
	// credential (identity.Credential.Audiences); nil means the
	// authenticator's own (the native API's).
	audiences []string

	// methods, when not empty, are the only authentication methods the
	// API accepts.
	methods []identity.Method

	// asMethod, when set, replaces the authenticated caller's Method once
	// methods are checked: a batch entry's SVID proof is authenticated as
	// an mTLS client certificate, and audited as identity.MethodSVIDProof.
	asMethod identity.Method

	// proof, when set, checks the credential's proof of possession (a
	// batch entry's SVID proof): a signature check, made under admission
	// with the chain's verification, before authentication.
	proof func(identity.Credential) error

	// refused, when set, refuses the request once the caller is
	// authenticated, so that the refusal is audited with the caller: a
	// front end's refusal of what its wire format allows and meshca does
	// not (Istio's impersonation).
	refused error
}

// csrForm reads the CSR of a front end's request: it checks the CSR and
// returns the certificate to sign, whose ID is the identity the policy
// must allow the caller. The form never decides who the caller is.
type csrForm interface {
	read(raw []byte, td spiffeid.TrustDomain) (ca.SignRequest, error)
}

// svidForm is the X509-SVID request of the native and Istio APIs: the
// SPIFFE ID as the CSR's only URI SAN (ca.ParseCSR).
type svidForm struct {
	policy ca.CSRPolicy
}

func (f svidForm) read(raw []byte, td spiffeid.TrustDomain) (ca.SignRequest, error) {
	csr, err := ca.ParseCSR(raw, td, f.policy)
	if err != nil {
		return ca.SignRequest{}, err
	}
	return ca.SignRequest{PublicKey: csr.PublicKey, ID: csr.ID}, nil
}

// refusal is a front end's own refusal of a request, with the gRPC code
// and reason label it is given at the edge. Its message never holds a
// credential.
type refusal struct {
	code   codes.Code
	reason string
	msg    string
}

func (r *refusal) Error() string { return "server: " + r.msg }

func refusef(code codes.Code, reason, format string, args ...any) *refusal {
	return &refusal{code: code, reason: reason, msg: fmt.Sprintf(format, args...)}
}

// issue authenticates the caller, validates the CSR, authorises the
// identity and signs. Its error is a gRPC status error.
func (s *Server) issue(ctx context.Context, r issueRequest) (*ca.Issued, error) {
	start := time.Now()
	caller, issued, err := s.authorizeAndSign(ctx, r)
	peerAddr := "unknown"
	if p, ok := peer.FromContext(ctx); ok {
		peerAddr = p.Addr.String()
	}
	attrs := []slog.Attr{
		slog.String("api", r.api),
		slog.String("peer", peerAddr),
		slog.String("method", string(caller.Method)),
		slog.String("caller", caller.Subject),
		slog.String("identity", idString(caller)),
	}
	if err != nil {
		st, reason := toStatus(err)
		s.metrics.denied.WithLabelValues(r.api, st.Code().String(), reason).Inc()
		s.metrics.latency.WithLabelValues(r.api, "denied").Observe(time.Since(start).Seconds())
		if st.Code() == codes.Internal {
			s.log.LogAttrs(ctx, slog.LevelError, "signing failed", slog.Any("error", err))
		}
		s.auditLine(ctx, "certificate request denied", append(attrs,
			slog.String("result", "denied"),
			slog.String("code", st.Code().String()),
			slog.String("reason", reason),
			slog.String("error", st.Message()))...)
		return nil, st.Err()
	}
	if s.observer != nil {
		s.observer.Observe(caller.ID, r.bundleSequence)
	}
	s.metrics.issued.WithLabelValues(r.api).Inc()
	s.metrics.latency.WithLabelValues(r.api, "issued").Observe(time.Since(start).Seconds())
	s.auditLine(ctx, "certificate issued", append(attrs,
		slog.String("result", "issued"),
		slog.String("serial", issued.Cert.SerialNumber.Text(16)),
		slog.Time("not_after", issued.Cert.NotAfter),
		// Zero asked for the default. A TTL cut by the policy's maximum
		// or the issuer's expiry is clamped, not refused: say so.
		slog.Duration("requested_ttl", r.ttl),
		slog.Duration("ttl", issued.TTL),
		slog.Bool("ttl_clamped", issued.TTLClamped))...)
	return issued, nil
}

// auditLine writes one audit line. It is slog's LogAttrs without the
// caller's program counter, which slog records for every line (a stack
// walk per certificate) and no audit line shows.
func (s *Server) auditLine(ctx context.Context, msg string, attrs ...slog.Attr) {
	h := s.audit.Handler()
	if !h.Enabled(ctx, slog.LevelInfo) {
		return
	}
	r := slog.NewRecord(time.Now(), slog.LevelInfo, msg, 0)
	r.AddAttrs(attrs...)
	if err := h.Handle(ctx, r); err != nil {
		s.log.LogAttrs(ctx, slog.LevelError, "writing an audit line failed", slog.Any("error", err))
	}
}

func (s *Server) authorizeAndSign(ctx context.Context, r issueRequest) (identity.Caller, *ca.Issued, error) {
	// The cheapest refusal first: a flooding source costs no token
	// review and no signature check.
	if err := s.limits.allowSource(ctx); err != nil {
		return identity.Caller{}, nil, err
	}
	readCredential := r.credential
	if readCredential == nil {
		readCredential = credentialFrom
	}
	cred, err := readCredential(ctx)
	if err != nil {
		return identity.Caller{}, nil, err
	}
	cred.Audiences = r.audiences
	// A caller that proves itself with a certificate chain (an mTLS
	// renewal, a batch entry's SVID proof) costs signature checks to
	// authenticate: it takes its admission slot, as a renewal, before
	// them. A token caller takes its slot once authenticated, so that a
	// token review, which waits on the API server, holds none.
	var start time.Time
	admitted := cred.Token == "" && len(cred.PeerCertificates) > 0
	if admitted {
		if start, err = s.admit.acquire(ctx, classRenewal); err != nil {
			return identity.Caller{}, nil, err
		}
		defer s.admit.release(start)
	}
	if r.proof != nil {
		if err := r.proof(cred); err != nil {
			return identity.Caller{}, nil, err
		}
	}
	// Authenticate first: an anonymous caller costs no CSR verification.
	caller, err := s.authn.Authenticate(ctx, cred)
	if err != nil {
		return identity.Caller{}, nil, err
	}
	if len(r.methods) > 0 {
		if err := caller.RequireMethod(r.methods...); err != nil {
			return caller, nil, err
		}
	}
	if r.asMethod != "" {
		caller.Method = r.asMethod
	}
	if r.refused != nil {
		return caller, nil, r.refused
	}
	// A banned caller (renewing over mTLS, or with a token) is refused
	// before its CSR costs anything.
	if err := s.checkBans(caller.ID); err != nil {
		return caller, nil, err
	}
	// One bucket per identity across the APIs, before the CSR's
	// signature is checked.
	if err := s.limits.allowIdentity(caller.ID); err != nil {
		return caller, nil, err
	}
	// From here the request costs CPU: a signature check and a
	// signature. It waits for its turn, first certificates first, or is
	// shed with a retry hint.
	if !admitted {
		if start, err = s.admit.acquire(ctx, classOf(caller)); err != nil {
			return caller, nil, err
		}
		defer s.admit.release(start)
	}
	form := r.form
	if form == nil {
		form = svidForm{}
	}
	req, err := form.read(r.csr, s.ca.TrustDomain())
	if err != nil {
		return caller, nil, err
	}
	if err := s.policy.Authorize(caller, req.ID); err != nil {
		if req.DNSOnly {
			// Say which name the policy's ID stands for.
			err = fmt.Errorf("server: identity %q is %q: %w", req.DNSNames[0], req.ID, err)
		}
		return caller, nil, err
	}
	if err := s.checkBans(req.ID); err != nil {
		return caller, nil, err
	}
	req.TTL = r.ttl
	issued, err := s.ca.Sign(ctx, req)
	return caller, issued, err
}

func idString(c identity.Caller) string {
	if c.ID.IsZero() {
		return ""
	}
	return c.ID.String()
}

// credentialFrom reads the caller's bearer token and TLS client
// certificates from the request context.
func credentialFrom(ctx context.Context) (identity.Credential, error) {
	var cred identity.Credential
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		token, err := identity.TokenFromHeaders(md.Get("authorization"))
		if err != nil {
			return cred, err
		}
		cred.Token = token
	}
	if p, ok := peer.FromContext(ctx); ok {
		if info, ok := p.AuthInfo.(credentials.TLSInfo); ok {
			cred.PeerCertificates = info.State.PeerCertificates
		}
	}
	return cred, nil
}

// toStatus turns an error of the request path into the gRPC status the
// caller sees, and the reason label of the denial metric. Caller mistakes
// keep their message, which never holds a credential; internal faults do
// not reach the caller.
func toStatus(err error) (*status.Status, string) {
	var (
		csrErr  *ca.CSRError
		authErr *identity.AuthError
		permErr *identity.PermissionError
		refused *refusal
		limited *limitError
		shed    *shedError
	)
	switch {
	// The whole message is sent: errors of the request path never hold a
	// credential, and an authenticator of another package may wrap the
	// reason with a message of its own.
	case errors.As(err, &refused):
		return status.New(refused.code, err.Error()), refused.reason
	case errors.As(err, &limited):
		return limited.status(), ReasonRateLimited
	case errors.As(err, &shed):
		return shed.status(), ReasonOverloaded
	case errors.As(err, &csrErr):
		return status.New(codes.InvalidArgument, err.Error()), string(csrErr.Reason)
	case errors.As(err, &authErr):
		switch authErr.Reason {
		case identity.ReasonUnavailable:
			return status.New(codes.Unavailable, err.Error()), string(authErr.Reason)
		case identity.ReasonOverloaded:
			return status.New(codes.ResourceExhausted, err.Error()), string(authErr.Reason)
		}
		return status.New(codes.Unauthenticated, err.Error()), string(authErr.Reason)
	case errors.As(err, &permErr):
		return status.New(codes.PermissionDenied, err.Error()), string(permErr.Reason)
	case errors.Is(err, context.Canceled):
		return status.New(codes.Canceled, "request canceled"), "canceled"
	case errors.Is(err, context.DeadlineExceeded):
		return status.New(codes.DeadlineExceeded, "request deadline exceeded"), "deadline"
	case errors.Is(err, ca.ErrNoIssuer):
		return status.New(codes.Unavailable, "the CA has no valid issuing authority; try again later"), "no_issuer"
	}
	return status.New(codes.Internal, "internal error while signing; see the server log"), "internal"
}
