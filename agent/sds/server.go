package sds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

// Default secret names.
const (
	// DefaultCertificateName names the tls_certificate secret, as Istio's
	// agent does.
	DefaultCertificateName = "default"

	// DefaultValidationContextName names the validation_context secret
	// holding the roots of the SVID's trust domain, as Istio's agent does.
	DefaultValidationContextName = "ROOTCA"

	// DefaultFederatedValidationContextName names the validation_context
	// secret that verifies peers of every trusted trust domain with Envoy's
	// SPIFFE certificate validator, as SPIRE's agent does.
	DefaultFederatedValidationContextName = "ALL"
)

// Source is what Server serves: the workload's X509-SVID, the bundle of its
// trust domain and the federated bundles, and a signal when any of them
// changes. rotation.Source is one.
type Source interface {
	// GetX509SVID returns the current X509-SVID, or an error while there
	// is none.
	GetX509SVID() (*x509svid.SVID, error)

	// GetX509BundleForTrustDomain returns the bundle of a trust domain.
	// Server asks only for the SVID's own.
	GetX509BundleForTrustDomain(spiffeid.TrustDomain) (*x509bundle.Bundle, error)

	// FederatedBundles returns the bundles of the federated trust domains,
	// sorted by trust domain, never the SVID's own.
	FederatedBundles() []*x509bundle.Bundle

	// Changed returns a channel closed at the next change of any of the
	// above. Server takes it before it reads them.
	Changed() <-chan struct{}
}

// Options configure a Server. Only Source is required; the zero value of
// every other field is documented beside it. The three names must differ.
type Options struct {
	// Source provides what is served. Required.
	Source Source

	// CertificateName names the tls_certificate secret: the SVID's chain
	// and private key. Empty means DefaultCertificateName.
	CertificateName string

	// ValidationContextName names the validation_context secret whose
	// trusted_ca is the roots of the SVID's own trust domain only. Empty
	// means DefaultValidationContextName.
	ValidationContextName string

	// FederatedValidationContextName names the validation_context secret
	// that verifies peers of the own trust domain and of every federated
	// one: a custom_validator_config of Envoy's SPIFFE certificate
	// validator (envoy.tls.cert_validator.spiffe, Envoy 1.18 or later)
	// with each trust domain's roots kept apart. It is served always; a
	// proxy chooses federation by asking for it in place of
	// ValidationContextName. Empty means
	// DefaultFederatedValidationContextName.
	FederatedValidationContextName string

	// Logger receives what is published, streams, and the secrets a proxy
	// rejects. Private keys are never logged. Nil discards.
	Logger *slog.Logger
}

// Server is an Envoy SDS server for one workload identity. Register it on a
// gRPC server, and Run it to follow the Source. A Server is safe for
// concurrent use.
type Server struct {
	src   Source
	names names
	log   *slog.Logger
	cache *secretCache
	xds   *xdsServer

	// stop ends open streams, so that a grpc.Server's GracefulStop can
	// complete once Run has returned.
	stop    context.CancelFunc
	running atomic.Bool

	mu        sync.Mutex // serialises publish
	version   uint64
	published []types.Resource // the secrets of the current snapshot
}

// names are the names of the served secrets.
type names struct {
	cert, roots, federated string
}

// New returns a Server for opts. Nothing is served until Run has published
// the first snapshot.
func New(opts Options) (*Server, error) {
	if opts.Source == nil {
		return nil, errors.New("sds: Options.Source is required: the SVID and bundles to serve")
	}
	n := names{
		cert:      orDefault(opts.CertificateName, DefaultCertificateName),
		roots:     orDefault(opts.ValidationContextName, DefaultValidationContextName),
		federated: orDefault(opts.FederatedValidationContextName, DefaultFederatedValidationContextName),
	}
	if n.cert == n.roots || n.cert == n.federated || n.roots == n.federated {
		return nil, fmt.Errorf("sds: secret names must differ; CertificateName %q, ValidationContextName %q, FederatedValidationContextName %q", n.cert, n.roots, n.federated)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With(slog.String("component", "sds"))
	c := newSecretCache(log, n.cert, n.roots, n.federated)
	ctx, stop := context.WithCancel(context.Background())
	s := &Server{
		src:   opts.Source,
		names: n,
		log:   log,
		cache: c,
		stop:  stop,
	}
	s.xds = newXDSServer(ctx, s)
	return s, nil
}

func orDefault(name, def string) string {
	if name == "" {
		return def
	}
	return name
}

// Register registers the SecretDiscoveryService and the
// AggregatedDiscoveryService on g.
func (s *Server) Register(g *grpc.Server) {
	secretv3.RegisterSecretDiscoveryServiceServer(g, s.xds)
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(g, s.xds)
}

// Run publishes the Source's SVID and bundles, and a new snapshot at each
// change, until ctx is done. A Source that has no SVID yet is waited for;
// one whose state cannot be served (no bundle for the SVID's trust domain)
// is logged and the previous snapshot kept. When Run returns, with ctx's
// error, the streams still open end. A Server runs once.
func (s *Server) Run(ctx context.Context) error {
	if !s.running.CompareAndSwap(false, true) {
		return errors.New("sds: Run has already been called on this server")
	}
	defer s.stop()
	for {
		changed := s.src.Changed()
		if err := s.publish(ctx); err != nil {
			s.log.LogAttrs(ctx, slog.LevelError, "cannot serve the current SVID and bundles; keeping the previous secrets", slog.Any("error", err))
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return fmt.Errorf("sds: stopped: %w", ctx.Err())
		}
	}
}

// publish builds the secrets from the Source and, when they differ from
// the published ones, sets them as a new snapshot version.
func (s *Server) publish(ctx context.Context) error {
	svid, err := s.src.GetX509SVID()
	if err != nil {
		if s.ready() {
			// Expired and not yet renewed: the proxy keeps what it has,
			// as a new snapshot could not hold anything better.
			s.log.LogAttrs(ctx, slog.LevelWarn, "no current X509-SVID; the proxy keeps the last one served", slog.Any("error", err))
		} else {
			s.log.LogAttrs(ctx, slog.LevelInfo, "waiting for the first X509-SVID before serving secrets", slog.Any("error", err))
		}
		return nil
	}
	td := svid.ID.TrustDomain()
	bundle, err := s.src.GetX509BundleForTrustDomain(td)
	if err != nil {
		return fmt.Errorf("sds: getting the bundle of %q: %w", td, err)
	}
	federated := s.src.FederatedBundles()
	secrets, err := s.build(ctx, svid, bundle, federated)
	if err != nil {
		return err
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if sameResources(secrets, s.published) {
		return nil
	}
	s.version++
	version := strconv.FormatUint(s.version, 10)
	snap, err := cachev3.NewSnapshot(version, map[resource.Type][]types.Resource{resource.SecretType: secrets})
	if err != nil {
		return fmt.Errorf("sds: snapshot %s: %w", version, err)
	}
	if err := s.cache.SetSnapshot(ctx, nodeKey, snap); err != nil {
		return fmt.Errorf("sds: setting snapshot %s: %w", version, err)
	}
	s.published = secrets
	leaf := svid.Certificates[0]
	s.log.LogAttrs(ctx, slog.LevelInfo, "serving secrets",
		slog.String("version", version),
		slog.String("spiffe_id", svid.ID.String()),
		slog.String("serial", leaf.SerialNumber.Text(16)),
		slog.Time("not_after", leaf.NotAfter),
		slog.Int("roots", len(bundle.X509Authorities())),
		slog.Any("federated_trust_domains", trustDomainNames(federated)))
	return nil
}

// ready reports whether a snapshot has been published.
func (s *Server) ready() bool {
	_, err := s.cache.GetSnapshot(nodeKey)
	return err == nil
}

func sameResources(a, b []types.Resource) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !proto.Equal(a[i], b[i]) {
			return false
		}
	}
	return true
}
