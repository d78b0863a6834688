// Command meshca-agent runs beside a workload, or per node for one
// identity: it gets the workload's X509-SVID from meshca-server with a
// service-account or bootstrap token, renews it before it expires, and
// serves it on a Unix socket (the SPIFFE Workload API and Envoy SDS) and
// as PEM files.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"

	"github.com/meshca/meshca/agent"
)

func main() {
	if err := newCommand(os.Stdout, os.Stderr).Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "meshca-agent:", err)
		os.Exit(1)
	}
}

// flagValues are the flags' values, copied over the file's when set.
type flagValues struct {
	Config
	filesCommand string
	sdsDisabled  bool
}

func newCommand(stdout, stderr io.Writer) *cobra.Command {
	var (
		configPath string
		flags      flagValues
	)
	cmd := &cobra.Command{
		Use:   "meshca-agent",
		Short: "Get, renew and serve a workload's SPIFFE certificate",
		Long: `meshca-agent gets a workload's X509-SVID from meshca-server with a
Kubernetes service-account token (or a bootstrap token), renews it at half
its life over mTLS, and serves it:

  - the SPIFFE Workload API on a Unix socket (go-spiffe and SPIRE clients);
  - Envoy SDS on the same socket, or its own (secrets "default" and "ROOTCA");
  - PEM files (cert, key, bundle) swapped atomically, with a command run
    after each change, for programs that only read files.

It keeps serving its last certificate while meshca-server is unreachable,
and after a restart reads it back from its files.`,
		Example: `  meshca-agent --server-address meshca.meshca-system.svc:8443 \
    --trust-bundle-file /var/run/meshca/bundle.pem \
    --token-file /var/run/secrets/tokens/meshca-token \
    --socket /run/meshca/agent.sock --files-dir /run/meshca/certs
  meshca-agent --config /etc/meshca/agent.yaml`,
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
			return run(ctx, cc, stderr)
		},
	}
	cmd.SetOut(stdout)
	cmd.SetErr(stderr)
	f := cmd.Flags()
	f.StringVar(&configPath, "config", "", "YAML config file; flags override its values")
	f.StringVar(&flags.ServerAddress, "server-address", "", "meshca-server's gRPC address (default 127.0.0.1:8443)")
	f.StringVar(&flags.ServerID, "server-id", "", "meshca-server's SPIFFE ID (default spiffe://<trust-domain>/meshca/server)")
	f.StringVar(&flags.TrustDomain, "trust-domain", "", "trust domain (default the SPIFFE ID's, else meshca.local)")
	f.StringVar(&flags.TrustBundleFile, "trust-bundle-file", "", "the trust domain's roots, PEM: the ConfigMap's bundle.pem (required)")
	f.StringVar(&flags.TokenFile, "token-file", "", "projected Kubernetes service-account token, re-read at every use")
	f.StringVar(&flags.BootstrapTokenFile, "bootstrap-token-file", "", "static bootstrap token file (mode 0600)")
	f.StringVar(&flags.SpiffeID, "spiffe-id", "", "the workload's SPIFFE ID (default from --namespace and --service-account, or the token)")
	f.StringVar(&flags.Namespace, "namespace", "", "the workload's Kubernetes namespace")
	f.StringVar(&flags.ServiceAccount, "service-account", "", "the workload's Kubernetes service account")
	f.DurationVar((*time.Duration)(&flags.TTL), "ttl", 0, "certificate lifetime to ask for (default the server's)")
	f.StringVar(&flags.Socket, "socket", "", "Workload API Unix socket (default /run/meshca/agent.sock)")
	f.Var(&flags.SocketMode, "socket-mode", `socket file mode, octal (default "0600")`)
	f.StringVar(&flags.SDS.Socket, "sds-socket", "", "SDS's own Unix socket (default the Workload API's)")
	f.BoolVar(&flags.sdsDisabled, "disable-sds", false, "serve no Envoy SDS")
	f.StringVar(&flags.Files.Dir, "files-dir", "", "write cert.pem, key.pem and bundle.pem here (default off)")
	f.StringVar(&flags.filesCommand, "files-command", "", `shell command run (sh -c) after each change of the files, e.g. "nginx -s reload"`)
	f.StringVar(&flags.LogLevel, "log-level", "", "debug, info, warn or error (default info)")
	f.StringVar(&flags.HealthAddress, "health-listen", "", "HTTP address of /healthz, /readyz and /metrics (default off)")
	return cmd
}

// override copies the flags that were set over the file's values.
func override(cmd *cobra.Command, cfg *Config, flags flagValues) {
	changed := cmd.Flags().Changed
	set := func(name string, dst *string, v string) {
		if changed(name) {
			*dst = v
		}
	}
	set("server-address", &cfg.ServerAddress, flags.ServerAddress)
	set("server-id", &cfg.ServerID, flags.ServerID)
	set("trust-domain", &cfg.TrustDomain, flags.TrustDomain)
	set("trust-bundle-file", &cfg.TrustBundleFile, flags.TrustBundleFile)
	set("token-file", &cfg.TokenFile, flags.TokenFile)
	set("bootstrap-token-file", &cfg.BootstrapTokenFile, flags.BootstrapTokenFile)
	set("spiffe-id", &cfg.SpiffeID, flags.SpiffeID)
	set("namespace", &cfg.Namespace, flags.Namespace)
	set("service-account", &cfg.ServiceAccount, flags.ServiceAccount)
	set("socket", &cfg.Socket, flags.Socket)
	set("sds-socket", &cfg.SDS.Socket, flags.SDS.Socket)
	set("files-dir", &cfg.Files.Dir, flags.Files.Dir)
	set("log-level", &cfg.LogLevel, flags.LogLevel)
	set("health-listen", &cfg.HealthAddress, flags.HealthAddress)
	if changed("ttl") {
		cfg.TTL = flags.TTL
	}
	if changed("socket-mode") {
		cfg.SocketMode = flags.SocketMode
	}
	if changed("disable-sds") {
		cfg.SDS.Disabled = flags.sdsDisabled
	}
	if changed("files-command") {
		cfg.Files.Command = nil
		if flags.filesCommand != "" {
			cfg.Files.Command = []string{"sh", "-c", flags.filesCommand}
		}
	}
}

func run(ctx context.Context, cfg *completeConfig, stderr io.Writer) error {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.LogLevel))
	log := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level}))

	bundle, err := x509bundle.Load(cfg.td, cfg.TrustBundleFile)
	if err != nil {
		return fmt.Errorf("trustBundleFile: %w", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	a, err := agent.New(agent.Config{
		ID:            cfg.id,
		ServerAddress: cfg.ServerAddress,
		ServerID:      cfg.serverID,
		TrustBundle:   bundle,
		Token:         tokenReader(cfg),
		TTL:           time.Duration(cfg.TTL),
		SocketPath:    cfg.Socket,
		SocketMode:    os.FileMode(cfg.SocketMode),
		MaxStreams:    cfg.MaxStreams,
		SDS: agent.SDSConfig{
			Disabled:                       cfg.SDS.Disabled,
			SocketPath:                     cfg.SDS.Socket,
			CertificateName:                cfg.SDS.CertificateName,
			ValidationContextName:          cfg.SDS.ValidationContextName,
			FederatedValidationContextName: cfg.SDS.FederatedValidationContextName,
		},
		Files: agent.FilesConfig{
			Dir:            cfg.Files.Dir,
			CertName:       cfg.Files.CertName,
			KeyName:        cfg.Files.KeyName,
			BundleName:     cfg.Files.BundleName,
			Command:        cfg.Files.Command,
			CommandTimeout: time.Duration(cfg.Files.CommandTimeout),
		},
		Logger:     log,
		Registerer: reg,
	})
	if err != nil {
		return err
	}

	var health *http.Server
	healthAddr := "off"
	if cfg.HealthAddress != "" {
		lis, err := net.Listen("tcp", cfg.HealthAddress)
		if err != nil {
			return fmt.Errorf("listening for health: %w", err)
		}
		healthAddr = lis.Addr().String()
		health = &http.Server{Handler: healthHandler(a, reg), ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := health.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("health server stopped", "error", err)
			}
		}()
		defer func() {
			sctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			_ = health.Shutdown(sctx)
		}()
	}

	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	select {
	case <-a.Listening():
		log.Info("meshca-agent ready",
			"spiffe_id", cfg.id.String(),
			"spiffe_id_from", cfg.idFrom,
			"socket", cfg.Socket,
			"health_address", healthAddr)
	case err := <-done:
		return err
	}
	return <-done
}

// healthHandler serves /healthz (the process answers), /readyz (a valid
// SVID is held) and /metrics.
func healthHandler(a *agent.Agent, reg *prometheus.Registry) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if err := a.Ready(); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = io.WriteString(w, "ok\n")
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	return mux
}
