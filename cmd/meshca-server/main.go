// Command meshca-server is meshca's certificate authority: it issues
// SPIFFE X509-SVIDs over gRPC to callers that authenticate with a token or
// their current certificate.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/filestore"
	"github.com/meshca/meshca/ca/kubestore"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/internal/securefile"
	"github.com/meshca/meshca/internal/server"
	"github.com/meshca/meshca/rotation"
)

// servingCertTTL is the lifetime of the server's own certificate; it is
// renewed at half of it.
const servingCertTTL = 24 * time.Hour

// shutdownGrace is how long in-flight requests get to finish on SIGTERM.
const shutdownGrace = 10 * time.Second

// defaultGCPercent is the server's GOGC when the environment sets none.
// The live heap is small (tens of MiB) and each certificate allocates
// about 20 KiB, so at Go's default of 100 the collector runs many times a
// second; 400 cuts its share of the CPU at full load by about half for
// some tens of MiB more (docs/benchmarks.md). GOGC and GOMEMLIMIT in the
// environment win.
const defaultGCPercent = 400

func main() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(defaultGCPercent)
	}
	if err := newCommand(os.Stdout, os.Stderr).Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "meshca-server:", err)
		os.Exit(1)
	}
}

func newCommand(stdout, stderr io.Writer) *cobra.Command {
	var (
		configPath string
		flags      Config
	)
	cmd := &cobra.Command{
		Use:   "meshca-server",
		Short: "Run the meshca certificate authority",
		Long: `meshca-server issues short-lived SPIFFE X509-SVIDs over gRPC (TLS).

Callers authenticate with "authorization: Bearer <token>" metadata (a
bootstrap token) or by presenting their current SVID to renew. Besides its
own API it serves Istio's CA API (on by default) and, in Kubernetes mode,
Linkerd's identity API. With no
flags and no config file it runs on an embedded default: trust domain
meshca.local, data in ./.meshca, gRPC on 127.0.0.1:8443, metrics on
127.0.0.1:9402.`,
		Example: `  meshca-server --demo
  meshca-server --config /etc/meshca/config.yaml`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg := Config{}
			if configPath != "" {
				var err error
				if cfg, err = loadConfig(configPath); err != nil {
					return err
				}
			}
			override(cmd, &cfg, flags)
			cc, err := cfg.complete()
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return run(ctx, cc, stdout, stderr)
		},
	}
	cmd.SetOut(stdout)
	cmd.SetErr(stderr)
	f := cmd.Flags()
	f.StringVar(&configPath, "config", "", "YAML config file; flags override its values")
	f.StringVar(&flags.TrustDomain, "trust-domain", "", "trust domain to issue for (default meshca.local)")
	f.StringVar(&flags.ListenAddress, "listen", "", "gRPC listen address (default 127.0.0.1:8443)")
	f.StringVar(&flags.MetricsAddress, "metrics-listen", "", `metrics listen address, or "off" (default 127.0.0.1:9402)`)
	f.StringVar(&flags.HealthAddress, "health-listen", "", "plain-text gRPC health listen address for kubelet probes (default off)")
	f.StringVar(&flags.DataDir, "data-dir", "", "directory of the CA's state and keys (default .meshca)")
	f.StringVar(&flags.BootstrapTokens, "bootstrap-tokens", "", "static bootstrap token file (YAML)")
	f.StringVar(&flags.LogLevel, "log-level", "", "debug, info, warn or error (default info)")
	f.BoolVar(&flags.Demo, "demo", false, "create a demo bootstrap token and print a meshctl command to try it")
	f.BoolVar(&flags.Profiling, "profiling", false, "serve /debug/pprof on the metrics address")
	return cmd
}

// override copies the flags that were set over the file's values.
func override(cmd *cobra.Command, cfg *Config, flags Config) {
	set := func(name string, dst *string, v string) {
		if cmd.Flags().Changed(name) {
			*dst = v
		}
	}
	set("trust-domain", &cfg.TrustDomain, flags.TrustDomain)
	set("listen", &cfg.ListenAddress, flags.ListenAddress)
	set("metrics-listen", &cfg.MetricsAddress, flags.MetricsAddress)
	set("health-listen", &cfg.HealthAddress, flags.HealthAddress)
	set("data-dir", &cfg.DataDir, flags.DataDir)
	set("bootstrap-tokens", &cfg.BootstrapTokens, flags.BootstrapTokens)
	set("log-level", &cfg.LogLevel, flags.LogLevel)
	if cmd.Flags().Changed("demo") {
		cfg.Demo = flags.Demo
	}
	if cmd.Flags().Changed("profiling") {
		cfg.Profiling = flags.Profiling
	}
}

func run(ctx context.Context, cfg *completeConfig, stdout, stderr io.Writer) error {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.LogLevel))
	log := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level}))
	// Audit lines are written whatever the log level.
	audit := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))

	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("data directory: %w", err)
	}
	var kube *kubeEnv
	if cfg.Kubernetes.Enabled {
		var err error
		if kube, err = newKubeEnv(cfg.Kubernetes, log); err != nil {
			return err
		}
	}
	// upstream holds the roots in mode vault; nil in the other modes.
	var upstream ca.Upstream
	if cfg.vault != nil {
		up, err := newVaultUpstream(cfg, log)
		if err != nil {
			return err
		}
		upstream = up
	}
	set, store, err := loadAuthorities(ctx, cfg, kube, upstream)
	if err != nil {
		return err
	}
	c, err := ca.New(set, ca.Options{TTL: cfg.ttl})
	if err != nil {
		return err
	}
	bundlePath := filepath.Join(cfg.DataDir, "bundle.pem")
	if err := writeBundle(bundlePath, c); err != nil {
		return err
	}
	go followBundle(ctx, bundlePath, c, log)

	maxLeafTTL := cfg.ttl.Longest()
	tracker := rotation.NewTracker(maxLeafTTL, nil)
	// With replicas, each sees only the workloads that renew with it: the
	// leader cannot know that every workload holds a prepared root, and
	// activate waits one leaf lifetime instead.
	gate := tracker
	if kube != nil {
		gate = nil
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	var manager *rotation.Manager
	if store != nil {
		manager, err = rotation.NewManager(rotation.ManagerOptions{
			CA:            c,
			Store:         store,
			Authority:     authorityOptions(cfg),
			MaxLeafTTL:    maxLeafTTL,
			Tracker:       gate,
			CheckInterval: time.Duration(cfg.Authority.RotationCheckInterval),
			Logger:        log,
			AfterSave:     failpoint(log),
			Upstream:      upstream,
			Registerer:    reg,
		})
		if err != nil {
			return err
		}
	}

	bans, err := loadBans(ctx, cfg, kube, reg, log)
	if err != nil {
		return err
	}
	go func() { _ = bans.Run(ctx) }()
	// The federator publishes its stored peers' bundles at once, before
	// any fetch; it fetches once Run runs.
	fed, err := newFederator(ctx, cfg, reg, log)
	if err != nil {
		return err
	}
	if kube != nil {
		kube.federated = fed
	}
	// adminLeader says who may run rotation steps: this replica, unless
	// replicas elect a leader.
	var adminLeader func() (bool, string)
	electionDone := make(chan struct{})
	if kube == nil {
		close(electionDone)
		if manager != nil {
			go func() { _ = manager.Run(ctx) }()
		}
	} else {
		elector, err := startKubernetes(ctx, kube, cfg, c, store, manager, reg, electionDone)
		if err != nil {
			return err
		}
		adminLeader = func() (bool, string) { return elector.IsLeader(), elector.Leader() }
	}

	authns := []identity.Authenticator{}
	tokens, demoTokenPath, demo, err := loadTokens(cfg)
	if err != nil {
		return err
	}
	if tokens != nil {
		authns = append(authns, tokens)
		if cfg.BootstrapTokens != "" {
			go watchTokenFile(ctx, cfg, tokens, demo, log, tokenCheckInterval)
		}
	}
	if kube != nil {
		reviews, err := kube.authenticator(cfg, reg)
		if err != nil {
			return err
		}
		authns = append(authns, reviews)
	}
	// Tokens first: a workload whose certificate no longer verifies (its
	// root was retired early) recovers with its token, even while its TLS
	// stack still presents the stale certificate.
	authns = append(authns, identity.NewSVIDAuthenticator(cfg.td, c, nil))
	srv, err := server.New(server.Options{
		CA:            c,
		Authenticator: identity.Chain(authns...),
		Policy:        cfg.identityPolicy(),
		Logger:        log,
		AuditLogger:   audit,
		Registerer:    reg,
		RefreshHint:   time.Duration(cfg.BundleRefreshHint),
		Observer:      tracker,
		Istio:         cfg.istio,
		Linkerd:       cfg.linkerd,
		Federated:     fed,
		Limits:        cfg.limits,
		Admission:     cfg.admit,
		Bans:          bans,
	})
	if err != nil {
		return err
	}
	serving, err := server.NewServingCert(c, cfg.serverID, cfg.Server.DNSNames, cfg.ips, servingCertTTL, nil)
	if err != nil {
		return err
	}
	fedCtx, stopFederation := context.WithCancel(ctx)
	defer stopFederation()
	fedLis, fedDone, err := startFederationEndpoint(fedCtx, cfg, c, serving, log)
	if err != nil {
		return err
	}
	fedRunDone := make(chan struct{})
	go func() { defer close(fedRunDone); _ = fed.Run(fedCtx) }()
	lis, err := net.Listen("tcp", cfg.ListenAddress)
	if err != nil {
		return fmt.Errorf("listening for gRPC: %w", err)
	}
	g := srv.GRPCServer(serving.TLSConfig())

	var metricsLis net.Listener
	var metricsSrv *http.Server
	if cfg.MetricsAddress != "off" {
		if metricsLis, err = net.Listen("tcp", cfg.MetricsAddress); err != nil {
			lis.Close()
			return fmt.Errorf("listening for metrics: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
		if cfg.Profiling {
			mux.HandleFunc("/debug/pprof/", pprof.Index)
			mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
			mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
			mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		}
		metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := metricsSrv.Serve(metricsLis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("metrics server stopped", "error", err)
			}
		}()
	}

	errc := make(chan error, 3) // gRPC, health and admin servers
	go func() { errc <- g.Serve(srv.LimitListener(lis)) }()

	var health *grpc.Server
	var healthLis net.Listener
	if cfg.HealthAddress != "" {
		healthLis, err = net.Listen("tcp", cfg.HealthAddress)
		if err != nil {
			lis.Close()
			return fmt.Errorf("listening for health: %w", err)
		}
		health = srv.HealthServer()
		go func() { errc <- health.Serve(healthLis) }()
	}

	var admin *grpc.Server
	if cfg.AdminSocket != "off" {
		adminLis, err := listenUnix(cfg.AdminSocket)
		if err != nil {
			lis.Close()
			return err
		}
		adminOpts := server.AdminOptions{CA: c, Manager: manager, Tracker: tracker, MaxLeafTTL: maxLeafTTL, Logger: audit, Leader: adminLeader,
			Federator: fed, ConfigPeers: cfg.fed.configPeers(), Bans: bans}
		if kube != nil {
			adminOpts.FixedPeers = kubernetesFixedPeers
		}
		admin = server.NewAdminServer(adminOpts)
		go func() { errc <- admin.Serve(adminLis) }()
	}
	active, _ := c.Authorities().ActiveRoot()
	root := active.Cert
	log.Info("meshca-server ready",
		"address", lis.Addr().String(),
		"metrics_address", addrOf(metricsLis),
		"health_address", addrOf(healthLis),
		"trust_domain", cfg.td.Name(),
		"server_id", cfg.serverID.String(),
		"root_serial", root.SerialNumber.Text(16),
		"root_not_after", root.NotAfter,
		"bundle", bundlePath,
		"admin_socket", cfg.AdminSocket,
		"istio_api", cfg.istio.Enabled,
		"linkerd_api", cfg.linkerd.Enabled,
		"federation_address", addrOf(fedLis),
		"federated_trust_domains", len(fed.Peers()),
		"bans_in_force", len(bans.List()))
	if cfg.Demo {
		printBanner(stdout, cfg, lis.Addr().String(), bundlePath, demoTokenPath)
	}

	select {
	case err := <-errc:
		return fmt.Errorf("gRPC server: %w", err)
	case err := <-fedDone:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down", "grace", shutdownGrace.String())
	if admin != nil {
		admin.Stop()
	}
	if health != nil {
		defer health.Stop() // answers NOT_SERVING until the end
	}
	srv.Shutdown()
	stopped := make(chan struct{})
	go func() { g.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(shutdownGrace):
		g.Stop()
	}
	if metricsSrv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = metricsSrv.Shutdown(sctx)
	}
	// The bundle endpoint shuts down gracefully with ctx; the federator
	// stops its fetches.
	stopFederation()
	if fedDone != nil {
		if err := <-fedDone; err != nil {
			log.Error("federation endpoint stopped", "error", err)
		}
	}
	<-fedRunDone
	// The leader hands its Lease over as it stops, so that another replica
	// takes over at once rather than after the Lease expires.
	select {
	case <-electionDone:
	case <-time.After(shutdownGrace):
		log.Warn("leader election did not stop in time; the Lease will expire on its own")
	}
	log.Info("stopped")
	return nil
}

// loadAuthorities returns the authority set and, when it is ours to
// rotate (modes selfsigned and vault), the store it lives in: a Secret in
// Kubernetes mode, shared by the replicas, else the data directory. In
// mode vault, up signs the first intermediate.
func loadAuthorities(ctx context.Context, cfg *completeConfig, kube *kubeEnv, up ca.Upstream) (*ca.AuthoritySet, ca.Store, error) {
	if cfg.Authority.Mode == "files" {
		f := cfg.Authority.Files
		set, err := ca.LoadFiles(cfg.td, ca.Files{RootCert: f.RootCert, CACert: f.CACert, CAKey: f.CAKey, CertChain: f.CertChain}, time.Now())
		return set, nil, err
	}
	if kube != nil {
		store, err := kube.store()
		if err != nil {
			return nil, nil, err
		}
		if err := kube.awaitStoredAuthorities(ctx, store, kube.storeWait(), kube.retryPeriod()/2); err != nil {
			return nil, nil, err
		}
		if up != nil {
			set, err := loadUpstreamAuthorities(ctx, store, authorityOptions(cfg), up)
			return set, store, err
		}
		set, err := kubestore.LoadOrCreate(ctx, store, authorityOptions(cfg))
		return set, store, err
	}
	store, err := filestore.New(cfg.DataDir)
	if err != nil {
		return nil, nil, err
	}
	if up != nil {
		set, err := loadUpstreamAuthorities(ctx, store, authorityOptions(cfg), up)
		return set, store, err
	}
	set, err := ca.LoadOrCreate(ctx, store, authorityOptions(cfg))
	return set, store, err
}

func authorityOptions(cfg *completeConfig) ca.AuthorityOptions {
	return ca.AuthorityOptions{
		TrustDomain:     cfg.td,
		RootTTL:         time.Duration(cfg.Authority.RootTTL),
		IntermediateTTL: time.Duration(cfg.Authority.IntermediateTTL),
	}
}

// followBundle rewrites the bundle file on every bundle change.
func followBundle(ctx context.Context, path string, c *ca.CA, log *slog.Logger) {
	for {
		_, _, changed := c.WatchBundle()
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
		if err := writeBundle(path, c); err != nil {
			log.Error("writing the bundle file", "path", path, "error", err)
		}
	}
}

// listenUnix listens on a Unix socket only its owner can connect to,
// replacing a socket left by a previous run.
func listenUnix(path string) (net.Listener, error) {
	if info, err := os.Lstat(path); err == nil {
		if info.Mode()&fs.ModeSocket == 0 {
			return nil, fmt.Errorf("admin socket %s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("admin socket: %w", err)
		}
	}
	// The umask makes the socket private from its creation: no window in
	// which others could connect before a chmod.
	old := syscall.Umask(0o077)
	lis, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	return lis, nil
}

// failpointEnv names a step after whose save the server kills itself, for
// the crash tests. Never set it outside them.
const failpointEnv = "MESHCA_FAILPOINT_KILL_AFTER_SAVE"

func failpoint(log *slog.Logger) func(rotation.Step) {
	step := os.Getenv(failpointEnv)
	if step == "" {
		return nil
	}
	log.Warn("failpoint armed: the server will kill itself after saving this step", "step", step)
	return func(s rotation.Step) {
		if string(s) == step {
			_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {} // the signal is on its way
		}
	}
}

func writeBundle(path string, c *ca.CA) error {
	bundle, _ := c.Bundle()
	pem, err := bundle.Marshal()
	if err != nil {
		return fmt.Errorf("encoding bundle: %w", err)
	}
	return securefile.WriteFile(path, pem, 0o644)
}

// demoID is the identity of the demo token.
func demoID(td spiffeid.TrustDomain) spiffeid.ID {
	return spiffeid.RequireFromPath(td, "/ns/default/sa/demo")
}

// loadTokens returns the static token authenticator of the token file
// and, in demo mode, the demo token, with the demo token's path and the
// token; nil when there is neither.
func loadTokens(cfg *completeConfig) (st *identity.StaticTokens, demoPath, demo string, err error) {
	if cfg.Demo {
		demoPath = filepath.Join(cfg.DataDir, "demo-token")
		if demo, err = demoToken(demoPath); err != nil {
			return nil, "", "", err
		}
	}
	file, err := tokenFile(cfg, demo)
	if err != nil {
		return nil, "", "", err
	}
	if len(file.Tokens) == 0 && cfg.BootstrapTokens == "" {
		return nil, "", "", nil
	}
	if st, err = identity.NewStaticTokens(file, cfg.td); err != nil {
		return nil, "", "", fmt.Errorf("bootstrap tokens: %w", err)
	}
	return st, demoPath, demo, nil
}

// tokenFile reads the bootstrap token file, if any, and adds the demo
// token, if any.
func tokenFile(cfg *completeConfig, demo string) (identity.TokenFile, error) {
	var file identity.TokenFile
	if cfg.BootstrapTokens != "" {
		var err error
		if file, err = identity.ReadTokenFile(cfg.BootstrapTokens); err != nil {
			return file, err
		}
	}
	if demo != "" {
		file.Tokens = append(file.Tokens, identity.TokenFileEntry{ID: demoID(cfg.td).String(), Token: demo})
	}
	return file, nil
}

// tokenCheckInterval is how often the bootstrap token file is checked for
// a change.
const tokenCheckInterval = 10 * time.Second

// watchTokenFile replaces st's tokens with the file's whenever the file
// changes (its size or modification time; a Kubernetes Secret volume
// swaps it whole), checked every interval until ctx is done. A file that
// cannot be read or has a bad entry leaves the tokens in use as they are,
// and is logged, without its content.
func watchTokenFile(ctx context.Context, cfg *completeConfig, st *identity.StaticTokens, demo string, log *slog.Logger, interval time.Duration) {
	stamp := func() (time.Time, int64) {
		info, err := os.Stat(cfg.BootstrapTokens)
		if err != nil {
			return time.Time{}, -1
		}
		return info.ModTime(), info.Size()
	}
	mtime, size := stamp()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		m, n := stamp()
		if m.Equal(mtime) && n == size {
			continue
		}
		mtime, size = m, n
		file, err := tokenFile(cfg, demo)
		if err == nil {
			err = st.Replace(file)
		}
		if err != nil {
			log.Error("bootstrap token file changed but was not loaded; the tokens in use stay", "file", cfg.BootstrapTokens, "error", err)
			continue
		}
		log.Info("bootstrap token file reloaded", "file", cfg.BootstrapTokens, "tokens", st.Len())
	}
}

// demoToken reads the demo token at path, creating it on first start.
func demoToken(path string) (string, error) {
	data, err := securefile.ReadPrivate(path)
	if err == nil {
		return strings.TrimSpace(string(data)), nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return "", err
	}
	var b [24]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	token := hex.EncodeToString(b[:])
	if err := securefile.WriteFile(path, []byte(token+"\n"), 0o600); err != nil {
		return "", err
	}
	return token, nil
}

func printBanner(w io.Writer, cfg *completeConfig, addr, bundlePath, tokenPath string) {
	fmt.Fprintf(w, `
meshca is running.

  address       %s
  trust domain  %s
  trust bundle  %s
  demo identity %s (token in %s)

Get a certificate:

  go run ./cmd/meshctl issue --server %s --ca-bundle %s \
    --token-file %s --spiffe-id %s --out-dir /tmp/meshca-demo

`, addr, cfg.td.Name(), bundlePath, demoID(cfg.td), tokenPath, addr, bundlePath, tokenPath, demoID(cfg.td))
}

func addrOf(l net.Listener) string {
	if l == nil {
		return "off"
	}
	return l.Addr().String()
}
