package main

import (
	"cmp"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity/federation"
	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/internal/server"
)

// federationStateFile is the Federator's store in the data directory.
const federationStateFile = "federation.json"

// kubernetesFixedPeers is why peers are not added or removed at run time
// in Kubernetes mode: each replica runs its own federator, and a change
// made on one would not reach the others, whose Sign responses would then
// disagree.
const kubernetesFixedPeers = "in Kubernetes mode the federation peers come from the config (federation.peers), " +
	"the same on every replica: change the config and roll the Deployment out"

// federationSettings is the federation config, parsed and checked.
type federationSettings struct {
	endpointProfile federation.Profile
	defaultRefresh  time.Duration
	minRefresh      time.Duration
	maxRefresh      time.Duration
	peers           []federation.Peer // of the config file, in its order
}

// configPeers returns the trust domains of the config file's peers.
func (f federationSettings) configPeers() []spiffeid.TrustDomain {
	out := make([]spiffeid.TrustDomain, len(f.peers))
	for i, p := range f.peers {
		out[i] = p.TrustDomain
	}
	return out
}

// completeFederation checks the federation section and reads the peers'
// bundle and CA files. The Federator checks the peers again, in full, when
// the server starts.
func (cc *completeConfig) completeFederation() error {
	f := cc.Federation
	var errs []error
	ep := f.Endpoint
	cc.fed.endpointProfile = federation.Profile(cmp.Or(ep.Profile, string(federation.ProfileHTTPSSPIFFE)))
	switch {
	case ep.ListenAddress == "" && (ep.Profile != "" || ep.CertFile != "" || ep.KeyFile != ""):
		errs = append(errs, errors.New("federation.endpoint: profile, certFile and keyFile configure an endpoint, and listenAddress is empty (no endpoint)"))
	case ep.ListenAddress == "":
	case cc.fed.endpointProfile == federation.ProfileHTTPSSPIFFE:
		if ep.CertFile != "" || ep.KeyFile != "" {
			errs = append(errs, errors.New("federation.endpoint: profile https_spiffe serves the server's own X509-SVID; certFile and keyFile are for https_web"))
		}
	case cc.fed.endpointProfile == federation.ProfileHTTPSWeb:
		if ep.CertFile == "" || ep.KeyFile == "" {
			errs = append(errs, errors.New("federation.endpoint: profile https_web needs certFile and keyFile, the endpoint's Web PKI certificate and key"))
		}
	default:
		errs = append(errs, fmt.Errorf("federation.endpoint.profile %q: want https_spiffe or https_web", ep.Profile))
	}

	cc.fed.defaultRefresh = time.Duration(f.RefreshHint)
	cc.fed.minRefresh = cmp.Or(time.Duration(f.MinRefresh), federation.DefaultMinRefresh)
	cc.fed.maxRefresh = cmp.Or(time.Duration(f.MaxRefresh), federation.DefaultMaxRefresh)
	switch {
	case f.RefreshHint < 0 || f.MinRefresh < 0 || f.MaxRefresh < 0:
		errs = append(errs, errors.New("federation: refreshHint, minRefresh and maxRefresh must not be negative"))
	case cc.fed.minRefresh > cc.fed.maxRefresh:
		errs = append(errs, fmt.Errorf("federation: minRefresh %s is above maxRefresh %s", cc.fed.minRefresh, cc.fed.maxRefresh))
	}

	seen := map[spiffeid.TrustDomain]bool{}
	for i, pc := range f.Peers {
		p, err := cc.configPeer(pc)
		if err != nil {
			errs = append(errs, fmt.Errorf("federation.peers[%d]: %w", i, err))
			continue
		}
		if seen[p.TrustDomain] {
			errs = append(errs, fmt.Errorf("federation.peers[%d]: trust domain %q appears more than once", i, p.TrustDomain.Name()))
			continue
		}
		seen[p.TrustDomain] = true
		cc.fed.peers = append(cc.fed.peers, p)
	}
	return errors.Join(errs...)
}

// configPeer reads one peer of the config file.
func (cc *completeConfig) configPeer(pc FederationPeerConfig) (federation.Peer, error) {
	if pc.TrustDomain == "" {
		return federation.Peer{}, errors.New("trustDomain is required")
	}
	td, err := spiffeid.TrustDomainFromString(pc.TrustDomain)
	if err != nil {
		return federation.Peer{}, fmt.Errorf("trustDomain %q: %w", pc.TrustDomain, err)
	}
	if td == cc.td {
		return federation.Peer{}, fmt.Errorf("trustDomain %q is this server's own", td.Name())
	}
	p := federation.Peer{TrustDomain: td, URL: pc.URL, Profile: federation.Profile(pc.Profile)}
	if pc.URL == "" {
		return p, fmt.Errorf("%s: url is required, the peer's bundle endpoint", td.Name())
	}
	switch p.Profile {
	case federation.ProfileHTTPSSPIFFE:
		if pc.WebCAFile != "" {
			return p, fmt.Errorf("%s: webCAFile is for profile https_web", td.Name())
		}
		if pc.EndpointID == "" {
			return p, fmt.Errorf("%s: profile https_spiffe needs endpointID, the SPIFFE ID the endpoint presents (a meshca peer's is spiffe://%s/meshca/server)", td.Name(), td.Name())
		}
		if p.EndpointID, err = spiffeid.FromString(pc.EndpointID); err != nil {
			return p, fmt.Errorf("%s: endpointID %q: %w", td.Name(), pc.EndpointID, err)
		}
		if pc.BundleFile == "" {
			return p, fmt.Errorf("%s: profile https_spiffe needs bundleFile, the peer's bundle obtained out of band", td.Name())
		}
		data, err := os.ReadFile(pc.BundleFile)
		if err != nil {
			return p, fmt.Errorf("%s: bundleFile: %w", td.Name(), err)
		}
		if p.Bootstrap, err = server.ParsePeerBundle(td, data); err != nil {
			return p, fmt.Errorf("%s: bundleFile %s: %w", td.Name(), pc.BundleFile, err)
		}
	case federation.ProfileHTTPSWeb:
		if pc.EndpointID != "" || pc.BundleFile != "" {
			return p, fmt.Errorf("%s: endpointID and bundleFile are for profile https_spiffe", td.Name())
		}
		if pc.WebCAFile != "" {
			data, err := os.ReadFile(pc.WebCAFile)
			if err != nil {
				return p, fmt.Errorf("%s: webCAFile: %w", td.Name(), err)
			}
			if p.WebRoots, err = pemutil.ParseCertificates(data); err != nil {
				return p, fmt.Errorf("%s: webCAFile %s: %w", td.Name(), pc.WebCAFile, err)
			}
		}
	default:
		return p, fmt.Errorf("%s: profile %q: want https_spiffe or https_web", td.Name(), pc.Profile)
	}
	return p, nil
}

// newFederator returns the federator of the server: the peers of its
// store, <dataDir>/federation.json, with the config file's peers applied
// over them. In Kubernetes mode the config's peers are the only ones.
func newFederator(ctx context.Context, cfg *completeConfig, reg prometheus.Registerer, log *slog.Logger) (*federation.Federator, error) {
	fed, err := federation.New(ctx, federation.Options{
		TrustDomain:    cfg.td,
		Store:          federation.NewFileStore(filepath.Join(cfg.DataDir, federationStateFile)),
		DefaultRefresh: cfg.fed.defaultRefresh,
		MinRefresh:     cfg.fed.minRefresh,
		MaxRefresh:     cfg.fed.maxRefresh,
		Logger:         log,
		Registerer:     reg,
	})
	if err != nil {
		return nil, err
	}
	if err := applyConfigPeers(ctx, fed, cfg.fed.peers, cfg.Kubernetes.Enabled, log); err != nil {
		return nil, err
	}
	return fed, nil
}

// applyConfigPeers makes the config file's peers the federator's: each is
// added, or replaced when the stored one differs (its last good bundle is
// kept when it does not). With only set, the stored peers that are not in
// the config are removed.
func applyConfigPeers(ctx context.Context, fed *federation.Federator, peers []federation.Peer, only bool, log *slog.Logger) error {
	for _, p := range peers {
		if st, err := fed.Peer(p.TrustDomain); err == nil {
			if samePeer(st.Peer, p) {
				continue
			}
			log.Info("federation: the config changed a peer; replacing it", "trust_domain", p.TrustDomain.Name())
			if err := fed.RemovePeer(ctx, p.TrustDomain); err != nil {
				return fmt.Errorf("federation.peers: %w", err)
			}
		}
		if err := fed.AddPeer(ctx, p); err != nil {
			return fmt.Errorf("federation.peers: %w", err)
		}
	}
	if !only {
		return nil
	}
	for _, st := range fed.Peers() {
		td := st.Peer.TrustDomain
		if slices.ContainsFunc(peers, func(p federation.Peer) bool { return p.TrustDomain == td }) {
			continue
		}
		log.Info("federation: a stored peer is not in the config; removing it", "trust_domain", td.Name())
		if err := fed.RemovePeer(ctx, td); err != nil {
			return fmt.Errorf("federation: %w", err)
		}
	}
	return nil
}

// samePeer reports whether a and b are the same peer, configured alike.
func samePeer(a, b federation.Peer) bool {
	return a.TrustDomain == b.TrustDomain && a.URL == b.URL && a.Profile == b.Profile && a.EndpointID == b.EndpointID &&
		slices.EqualFunc(a.WebRoots, b.WebRoots, (*x509.Certificate).Equal) &&
		(a.Bootstrap == nil) == (b.Bootstrap == nil) && (a.Bootstrap == nil || a.Bootstrap.Equal(b.Bootstrap))
}

// startFederationEndpoint serves the bundle endpoint, if configured, until
// ctx ends. It returns the listener (nil when there is no endpoint) and a
// channel that receives Serve's result.
func startFederationEndpoint(ctx context.Context, cfg *completeConfig, c *ca.CA, serving *server.ServingCert, log *slog.Logger) (net.Listener, <-chan error, error) {
	ep := cfg.Federation.Endpoint
	if ep.ListenAddress == "" {
		return nil, nil, nil
	}
	opts := federation.EndpointOptions{
		TrustDomain: cfg.td,
		Bundles:     c,
		RefreshHint: cmp.Or(time.Duration(cfg.BundleRefreshHint), server.DefaultRefreshHint),
		Profile:     cfg.fed.endpointProfile,
		Logger:      log,
	}
	if opts.Profile == federation.ProfileHTTPSWeb {
		opts.CertFile, opts.KeyFile = ep.CertFile, ep.KeyFile
	} else {
		opts.GetCertificate = serving.GetCertificate
	}
	endpoint, err := federation.NewEndpoint(opts)
	if err != nil {
		return nil, nil, err
	}
	lis, err := net.Listen("tcp", ep.ListenAddress)
	if err != nil {
		return nil, nil, fmt.Errorf("listening for the federation endpoint: %w", err)
	}
	done := make(chan error, 1)
	go func() { done <- endpoint.Serve(ctx, lis) }()
	return lis, done, nil
}
