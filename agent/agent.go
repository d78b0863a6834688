package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"

	"github.com/meshca/meshca/agent/files"
	"github.com/meshca/meshca/agent/sds"
	"github.com/meshca/meshca/agent/workloadapi"
	"github.com/meshca/meshca/rotation"
)

// Defaults of Config.
const (
	// DefaultSocketMode lets only the agent's own user connect: whoever
	// can connect is served the workload's private key.
	DefaultSocketMode fs.FileMode = 0o600

	// DefaultShutdownGrace is how long open calls get to finish on
	// shutdown.
	DefaultShutdownGrace = 5 * time.Second
)

// maxRecvBytes bounds a request read from a local socket. Workload API
// requests are empty; an Envoy SDS request carries the node's metadata,
// a few KiB.
const maxRecvBytes = 1 << 20

// Config configures an Agent. ID, ServerAddress, TrustBundle and
// SocketPath are required; the zero value of every other field is
// documented beside it.
type Config struct {
	// ID is the workload's SPIFFE ID, the one identity the agent gets and
	// serves. Required.
	ID spiffeid.ID

	// ServerAddress is meshca-server's gRPC target, such as
	// "meshca.meshca-system.svc:8443" or "dns:///meshca:8443". Required.
	ServerAddress string

	// ServerID is the SPIFFE ID meshca-server must present. Zero means
	// spiffe://<ID's trust domain>/meshca/server.
	ServerID spiffeid.ID

	// TrustBundle holds the roots of ID's trust domain that verify the
	// server and the first SVID, until the server sends its bundle (the
	// ConfigMap's bundle.pem, or the server's data directory's). Required.
	TrustBundle *x509bundle.Bundle

	// Token returns the credential of the first SVID, and of any renewal
	// made without a valid SVID: a projected service-account token,
	// re-read at each call, or a bootstrap token. Renewals present the
	// current SVID over mTLS instead. Nil sends none.
	Token func(ctx context.Context) (string, error)

	// TTL is the SVID lifetime asked for. Zero means the server's default.
	TTL time.Duration

	// SocketPath is the Unix socket of the SPIFFE Workload API (and of
	// SDS, unless SDS.SocketPath names another). A stale socket file is
	// replaced; a live one, or a file that is not a socket, is refused.
	// Required.
	SocketPath string

	// SocketMode is the sockets' file mode. Zero means DefaultSocketMode.
	SocketMode fs.FileMode

	// SDS configures the Envoy SDS server.
	SDS SDSConfig

	// Files configures the PEM files. Off unless Files.Dir is set.
	Files FilesConfig

	// MaxStreams bounds the open Workload API streams. Zero means
	// workloadapi.DefaultMaxStreams.
	MaxStreams int

	// ShutdownGrace is how long open calls get to finish on shutdown.
	// Zero means DefaultShutdownGrace.
	ShutdownGrace time.Duration

	// Logger receives what the agent does. Tokens and private keys are
	// never logged. Nil discards.
	Logger *slog.Logger

	// Registerer receives the agent's metrics. Nil registers nowhere.
	Registerer prometheus.Registerer
}

// SDSConfig configures the Envoy SDS server (see package sds).
type SDSConfig struct {
	// Disabled turns SDS off.
	Disabled bool

	// SocketPath is SDS's own Unix socket. Empty means Config.SocketPath,
	// shared with the Workload API (the security header is then required
	// by the Workload API's methods only).
	SocketPath string

	// CertificateName, ValidationContextName and
	// FederatedValidationContextName name the secrets. Empty means sds's
	// defaults: "default", "ROOTCA" and "ALL".
	CertificateName                string
	ValidationContextName          string
	FederatedValidationContextName string
}

// FilesConfig configures the PEM files (see package files).
type FilesConfig struct {
	// Dir holds the files; empty means no files. On start, the SVID found
	// there is served at once while it is valid, so that a restart during
	// a CA outage is harmless.
	Dir string

	// CertName, KeyName and BundleName name the files. Empty means
	// "cert.pem", "key.pem" and "bundle.pem".
	CertName, KeyName, BundleName string

	// Command is run after each change of the files: the program and its
	// arguments, with no shell. Nil runs nothing.
	Command []string

	// CommandTimeout bounds one run of Command. Zero means
	// files.DefaultCommandTimeout.
	CommandTimeout time.Duration
}

// Agent gets and renews one workload's X509-SVID from meshca-server, and
// serves it on a Unix socket (SPIFFE Workload API and Envoy SDS) and in
// PEM files.
type Agent struct {
	cfg    Config
	log    *slog.Logger
	source *rotation.Source
	dial   rotation.Dialer
	api    *workloadapi.Server
	sds    *sds.Server
	files  *files.Writer

	listening chan struct{} // closed when the sockets accept
	ran       atomic.Bool
}

// New returns an Agent for cfg. It reads the SVID an earlier run left in
// Files.Dir, if any; it listens on nothing until Run.
func New(cfg Config) (*Agent, error) {
	if err := cfg.complete(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	a := &Agent{cfg: cfg, log: log, listening: make(chan struct{})}

	var initial *x509svid.SVID
	if cfg.Files.Dir != "" {
		w, err := files.New(files.Options{
			Dir:            cfg.Files.Dir,
			TrustDomain:    cfg.ID.TrustDomain(),
			CertName:       cfg.Files.CertName,
			KeyName:        cfg.Files.KeyName,
			BundleName:     cfg.Files.BundleName,
			Command:        cfg.Files.Command,
			CommandTimeout: cfg.Files.CommandTimeout,
			Logger:         log.With(slog.String("component", "files")),
			Registerer:     cfg.Registerer,
		})
		if err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
		a.files = w
		initial = a.loadInitialSVID()
	}

	src, err := rotation.NewSource(rotation.Options{
		ID:            cfg.ID,
		InitialBundle: cfg.TrustBundle,
		InitialSVID:   initial,
		Token:         cfg.Token,
		TTL:           cfg.TTL,
		Logger:        log.With(slog.String("component", "rotation")),
	})
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	a.source = src
	a.dial = src.Dialer(cfg.ServerAddress, cfg.ServerID)

	if a.api, err = workloadapi.New(workloadapi.Options{
		Source:      src,
		TrustDomain: cfg.ID.TrustDomain(),
		MaxStreams:  cfg.MaxStreams,
		Logger:      log.With(slog.String("component", "workloadapi")),
	}); err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	if !cfg.SDS.Disabled {
		if a.sds, err = sds.New(sds.Options{
			Source:                         src,
			CertificateName:                cfg.SDS.CertificateName,
			ValidationContextName:          cfg.SDS.ValidationContextName,
			FederatedValidationContextName: cfg.SDS.FederatedValidationContextName,
			Logger:                         log,
		}); err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
	}
	if err := registerMetrics(cfg.Registerer, src); err != nil {
		return nil, err
	}
	return a, nil
}

// complete checks cfg and fills in its defaults.
func (cfg *Config) complete() error {
	var errs []error
	if cfg.ID.IsZero() {
		errs = append(errs, errors.New("Config.ID is required: the workload's SPIFFE ID"))
	}
	if cfg.ServerAddress == "" {
		errs = append(errs, errors.New("Config.ServerAddress is required: meshca-server's gRPC address"))
	}
	if cfg.TrustBundle == nil {
		errs = append(errs, errors.New("Config.TrustBundle is required: the roots that verify meshca-server"))
	}
	if cfg.SocketPath == "" {
		errs = append(errs, errors.New("Config.SocketPath is required: the Workload API's Unix socket"))
	}
	if !cfg.ID.IsZero() {
		td := cfg.ID.TrustDomain()
		if cfg.ServerID.IsZero() {
			cfg.ServerID = spiffeid.RequireFromPath(td, "/meshca/server")
		} else if cfg.ServerID.TrustDomain() != td {
			errs = append(errs, fmt.Errorf("Config.ServerID %q is not in the workload's trust domain %q", cfg.ServerID, td))
		}
		if cfg.ServerID == cfg.ID {
			errs = append(errs, fmt.Errorf("Config.ID %q is the server's own ID", cfg.ID))
		}
	}
	if cfg.SocketMode&^fs.ModePerm != 0 {
		errs = append(errs, fmt.Errorf("Config.SocketMode %v has bits other than permissions", cfg.SocketMode))
	}
	if cfg.SocketMode == 0 {
		cfg.SocketMode = DefaultSocketMode
	}
	if cfg.ShutdownGrace < 0 {
		errs = append(errs, fmt.Errorf("Config.ShutdownGrace is %s; want zero (%s) or more", cfg.ShutdownGrace, DefaultShutdownGrace))
	}
	if cfg.ShutdownGrace == 0 {
		cfg.ShutdownGrace = DefaultShutdownGrace
	}
	if cfg.SDS.SocketPath == cfg.SocketPath {
		cfg.SDS.SocketPath = ""
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	return nil
}

// loadInitialSVID returns the SVID an earlier run wrote to the files, or
// nil. rotation.NewSource ignores it, and logs why, when it has expired
// or no longer verifies against the trust bundle.
func (a *Agent) loadInitialSVID() *x509svid.SVID {
	svid, err := a.files.Load()
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		a.log.Warn("ignoring the X509-SVID in the files directory", slog.Any("error", err))
		return nil
	case svid.ID != a.cfg.ID:
		a.log.Warn("ignoring the X509-SVID in the files directory: it is of another identity",
			slog.String("found", svid.ID.String()), slog.String("want", a.cfg.ID.String()))
		return nil
	}
	a.log.Info("found the X509-SVID of an earlier run in the files directory",
		slog.String("serial", svid.Certificates[0].SerialNumber.Text(16)),
		slog.Time("not_after", svid.Certificates[0].NotAfter))
	return svid
}

// Listening returns a channel closed once Run listens on its sockets.
func (a *Agent) Listening() <-chan struct{} { return a.listening }

// Ready returns nil when the agent holds a valid X509-SVID to serve, and
// the reason otherwise: none yet, or it expired while meshca-server was
// unreachable. It suits a readiness probe.
func (a *Agent) Ready() error {
	_, err := a.source.GetX509SVID()
	return err
}

// Run listens on the sockets and serves until ctx is done: it gets and
// renews the SVID, serves the Workload API and SDS, and writes the files.
// When ctx is done it ends open streams, lets calls finish within
// Config.ShutdownGrace, removes its sockets and returns nil. It returns
// an error when a socket cannot be listened on or a server fails. An
// Agent runs once.
func (a *Agent) Run(ctx context.Context) error {
	if !a.ran.CompareAndSwap(false, true) {
		return errors.New("agent: Run has already been called; an Agent runs once")
	}

	servers, err := a.listen()
	if err != nil {
		return err
	}
	close(a.listening)
	a.log.Info("meshca-agent listening",
		slog.String("spiffe_id", a.cfg.ID.String()),
		slog.String("server", a.cfg.ServerAddress),
		slog.String("socket", a.cfg.SocketPath),
		slog.String("sds_socket", a.sdsSocket()),
		slog.String("files_dir", a.cfg.Files.Dir))

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	wg.Go(func() { _ = a.source.Run(ctx, a.dial) })
	if a.files != nil {
		wg.Go(func() { _ = a.files.Run(ctx, a.source) })
	}
	if a.sds != nil {
		wg.Go(func() { _ = a.sds.Run(ctx) })
	}
	errc := make(chan error, len(servers))
	for _, s := range servers {
		wg.Go(func() {
			if err := s.g.Serve(s.lis); err != nil {
				errc <- fmt.Errorf("agent: serving on %s: %w", s.path, err)
			}
		})
	}

	var runErr error
	select {
	case <-ctx.Done():
		a.log.Info("meshca-agent shutting down", slog.Duration("grace", a.cfg.ShutdownGrace))
	case runErr = <-errc:
		a.log.Error("meshca-agent stopping", slog.Any("error", runErr))
	}
	cancel() // ends the source, the files writer and SDS's streams
	a.api.Shutdown()
	a.stop(servers)
	wg.Wait()
	a.log.Info("meshca-agent stopped")
	return runErr
}

// server is one gRPC server on one socket.
type server struct {
	g    *grpc.Server
	lis  *unixListener
	path string
}

// listen listens on the Workload API socket, and SDS's own when it has
// one, with the services registered.
func (a *Agent) listen() ([]server, error) {
	newServer := func() *grpc.Server {
		return grpc.NewServer(grpc.MaxRecvMsgSize(maxRecvBytes))
	}
	main := newServer()
	a.api.Register(main)
	lis, err := listenUnix(a.cfg.SocketPath, a.cfg.SocketMode)
	if err != nil {
		return nil, err
	}
	servers := []server{{g: main, lis: lis, path: a.cfg.SocketPath}}
	if a.sds != nil {
		if a.cfg.SDS.SocketPath == "" {
			a.sds.Register(main)
		} else {
			g := newServer()
			a.sds.Register(g)
			sdsLis, err := listenUnix(a.cfg.SDS.SocketPath, a.cfg.SocketMode)
			if err != nil {
				lis.remove()
				return nil, err
			}
			servers = append(servers, server{g: g, lis: sdsLis, path: a.cfg.SDS.SocketPath})
		}
	}
	return servers, nil
}

// stop stops the servers, gracefully within the grace period, and removes
// their sockets.
func (a *Agent) stop(servers []server) {
	var wg sync.WaitGroup
	for _, s := range servers {
		wg.Go(func() {
			stopped := make(chan struct{})
			go func() {
				s.g.GracefulStop()
				close(stopped)
			}()
			t := time.NewTimer(a.cfg.ShutdownGrace)
			defer t.Stop()
			select {
			case <-stopped:
			case <-t.C:
				a.log.Warn("calls still open after the grace period; closing them", slog.String("socket", s.path))
				s.g.Stop()
				<-stopped
			}
			s.lis.remove()
		})
	}
	wg.Wait()
}

func (a *Agent) sdsSocket() string {
	switch {
	case a.sds == nil:
		return "off"
	case a.cfg.SDS.SocketPath == "":
		return a.cfg.SocketPath
	default:
		return a.cfg.SDS.SocketPath
	}
}
