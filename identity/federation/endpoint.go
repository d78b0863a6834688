package federation

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultRefreshHint is the spiffe_refresh_hint the endpoint serves when
// EndpointOptions.RefreshHint is zero.
const DefaultRefreshHint = 5 * time.Minute

// Limits of the endpoint's HTTP server.
const (
	readHeaderTimeout = 10 * time.Second
	readTimeout       = 30 * time.Second
	writeTimeout      = 30 * time.Second
	idleTimeout       = 2 * time.Minute
	maxHeaderBytes    = 16 << 10
	shutdownTimeout   = 5 * time.Second
)

// BundleSource gives this trust domain's bundle and its sequence. *ca.CA
// is one.
type BundleSource interface {
	// Bundle returns the current trust bundle and its sequence.
	Bundle() (*x509bundle.Bundle, uint64)
}

// EndpointOptions configure an Endpoint.
type EndpointOptions struct {
	// TrustDomain is the trust domain whose bundle is served. Required.
	TrustDomain spiffeid.TrustDomain

	// Bundles gives the bundle to serve, read on every request. Required.
	Bundles BundleSource

	// RefreshHint is the spiffe_refresh_hint served, a whole number of
	// seconds (rounded up), at least one; zero means DefaultRefreshHint.
	// Peers fetch again after it, so a prepared root reaches them within
	// one hint: keep it well under the time between root prepare and
	// activate.
	RefreshHint time.Duration

	// Profile is how the endpoint authenticates itself. Required.
	Profile Profile

	// GetCertificate returns the endpoint's X509-SVID, for profile
	// https_spiffe (the server's serving certificate); nil for https_web.
	GetCertificate func(*tls.ClientHelloInfo) (*tls.Certificate, error)

	// CertFile and KeyFile hold the endpoint's Web PKI certificate chain
	// and key as PEM, for profile https_web; empty for https_spiffe. They
	// are read again when either file changes (a renamed or rewritten
	// file), so a renewed certificate is served without a restart. The key
	// file must not be readable by group or others.
	CertFile, KeyFile string

	// Logger receives operational logs; nil discards them.
	Logger *slog.Logger
}

// Endpoint is a SPIFFE bundle endpoint: it serves this trust domain's
// bundle, with spiffe_sequence and spiffe_refresh_hint, at "/" over
// HTTPS, for peers to federate with.
type Endpoint struct {
	td      spiffeid.TrustDomain
	log     *slog.Logger
	handler http.Handler
	tls     *tls.Config
}

// NewEndpoint returns the endpoint opts describe. For https_web it reads
// the certificate files once, to fail now when they are wrong.
func NewEndpoint(opts EndpointOptions) (*Endpoint, error) {
	if opts.TrustDomain.IsZero() {
		return nil, errors.New("federation: EndpointOptions.TrustDomain is required")
	}
	if opts.Bundles == nil {
		return nil, errors.New("federation: EndpointOptions.Bundles is required")
	}
	if opts.RefreshHint < 0 {
		return nil, fmt.Errorf("federation: negative refresh hint %s", opts.RefreshHint)
	}
	if opts.RefreshHint == 0 {
		opts.RefreshHint = DefaultRefreshHint
	}
	if r := opts.RefreshHint % time.Second; r != 0 {
		opts.RefreshHint += time.Second - r
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	conf := &tls.Config{MinVersion: tls.VersionTLS12}
	switch opts.Profile {
	case ProfileHTTPSWeb:
		if opts.GetCertificate != nil {
			return nil, errors.New("federation: profile https_web serves CertFile and KeyFile, not GetCertificate")
		}
		if opts.CertFile == "" || opts.KeyFile == "" {
			return nil, errors.New("federation: profile https_web needs CertFile and KeyFile")
		}
		kp, err := newKeyPairReloader(opts.CertFile, opts.KeyFile, log)
		if err != nil {
			return nil, err
		}
		conf.GetCertificate = kp.GetCertificate
	case ProfileHTTPSSPIFFE:
		if opts.GetCertificate == nil {
			return nil, errors.New("federation: profile https_spiffe needs GetCertificate, the server's X509-SVID")
		}
		if opts.CertFile != "" || opts.KeyFile != "" {
			return nil, errors.New("federation: profile https_spiffe serves the server's X509-SVID, not CertFile and KeyFile")
		}
		conf.GetCertificate = opts.GetCertificate
	default:
		return nil, fmt.Errorf("federation: unknown endpoint profile %q; want %q or %q", opts.Profile, ProfileHTTPSWeb, ProfileHTTPSSPIFFE)
	}
	src := &endpointSource{td: opts.TrustDomain, bundles: opts.Bundles, hint: opts.RefreshHint}
	inner, err := federation.NewHandler(opts.TrustDomain, src, federation.WithLogger(slogAdapter{log}))
	if err != nil {
		return nil, fmt.Errorf("federation: %w", err)
	}
	return &Endpoint{td: opts.TrustDomain, log: log, handler: rootOnly(inner), tls: conf}, nil
}

// rootOnly serves h at "/" only, and asks caches not to keep the bundle:
// a cached bundle is a stale one, which peers refuse.
func rootOnly(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Cache-Control", "no-store")
		h.ServeHTTP(w, r)
	})
}

// Handler returns the HTTP handler serving the bundle, for a caller that
// runs its own HTTPS server with TLSConfig.
func (e *Endpoint) Handler() http.Handler { return e.handler }

// TLSConfig returns the endpoint's TLS server configuration.
func (e *Endpoint) TLSConfig() *tls.Config { return e.tls.Clone() }

// Serve serves the endpoint over HTTPS on ln until ctx ends, then shuts
// down gracefully, and closes ln. It returns nil after a shutdown by ctx.
func (e *Endpoint) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{
		Handler:           e.handler,
		TLSConfig:         e.TLSConfig(),
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(e.log.Handler(), slog.LevelDebug),
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.ServeTLS(ln, "", "") }()
	e.log.Info("federation: bundle endpoint serving", "address", ln.Addr().String(), "trust_domain", e.td.Name())
	select {
	case err := <-errc:
		return fmt.Errorf("federation: bundle endpoint: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close()
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("federation: bundle endpoint: %w", err)
	}
	return nil
}

// endpointSource is the spiffebundle.Source the handler serves: the
// current bundle with its sequence and the refresh hint.
type endpointSource struct {
	td      spiffeid.TrustDomain
	bundles BundleSource
	hint    time.Duration
}

func (s *endpointSource) GetBundleForTrustDomain(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	b, seq := s.bundles.Bundle()
	switch {
	case td != s.td:
		return nil, fmt.Errorf("federation: no bundle for trust domain %q", td)
	case b == nil:
		return nil, errors.New("federation: no bundle yet")
	case b.TrustDomain() != s.td:
		return nil, fmt.Errorf("federation: the bundle source gave a bundle of %q, not %q", b.TrustDomain(), s.td)
	}
	sb := spiffebundle.FromX509Authorities(s.td, b.X509Authorities())
	sb.SetSequenceNumber(seq)
	sb.SetRefreshHint(s.hint)
	return sb, nil
}

// slogAdapter is go-spiffe's logger.Logger on a slog.Logger.
type slogAdapter struct{ l *slog.Logger }

func (a slogAdapter) Debugf(format string, args ...any) { a.l.Debug(fmt.Sprintf(format, args...)) }
func (a slogAdapter) Infof(format string, args ...any)  { a.l.Info(fmt.Sprintf(format, args...)) }
func (a slogAdapter) Warnf(format string, args ...any)  { a.l.Warn(fmt.Sprintf(format, args...)) }
func (a slogAdapter) Errorf(format string, args ...any) { a.l.Error(fmt.Sprintf(format, args...)) }
