package files

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshca/meshca/internal/pemutil"
)

// Defaults of Options.
const (
	DefaultCertName       = "cert.pem"
	DefaultKeyName        = "key.pem"
	DefaultBundleName     = "bundle.pem"
	DefaultCommandTimeout = 30 * time.Second
)

// DataLink is the symlink that names the current generation.
const DataLink = "..data"

// The files' modes. The directories are 0755 so that a workload running
// as another user can reach the certificate and bundle; the key is its
// owner's only.
const (
	dirMode    fs.FileMode = 0o755
	publicMode fs.FileMode = 0o644
	keyMode    fs.FileMode = 0o600
)

// retryInterval is the wait before a failed write is tried again.
const retryInterval = 10 * time.Second

// Source is what Writer writes: the X509-SVID, the bundle of its trust
// domain, and a signal when they change. rotation.Source is one.
type Source interface {
	x509svid.Source
	x509bundle.Source

	// Changed returns a channel closed at the next change. Writer takes
	// it before it reads the SVID and bundle.
	Changed() <-chan struct{}
}

// Options configure a Writer. Dir and TrustDomain are required.
type Options struct {
	// Dir holds the files. It is created, mode 0755, when missing. The
	// writer owns it: entries whose names start with ".." are its
	// generations, and old ones are removed.
	Dir string

	// TrustDomain is the SVID's trust domain, whose roots are written to
	// the bundle file. Required.
	TrustDomain spiffeid.TrustDomain

	// CertName, KeyName and BundleName name the files in Dir. They must
	// be plain names, distinct, not starting with "..". Empty means
	// DefaultCertName, DefaultKeyName and DefaultBundleName.
	CertName, KeyName, BundleName string

	// Command, when not empty, is run after every change of the files:
	// the program and its arguments, with no shell (use
	// {"sh", "-c", "..."} for one). Nil runs nothing.
	Command []string

	// CommandTimeout bounds one run of Command; when it expires the
	// command's process group is killed. Zero means
	// DefaultCommandTimeout.
	CommandTimeout time.Duration

	// Logger receives writes and command failures. Private keys are never
	// logged. Nil discards.
	Logger *slog.Logger

	// Registerer receives the writer's metrics. Nil registers nowhere.
	Registerer prometheus.Registerer
}

// Writer writes an X509-SVID and bundle into a directory atomically, and
// runs a command after each change. Its methods are safe for concurrent
// use; one write runs at a time.
type Writer struct {
	dir                        string
	td                         spiffeid.TrustDomain
	certName, keyName, bdlName string
	command                    []string
	timeout                    time.Duration
	log                        *slog.Logger
	metrics                    *metrics

	mu   sync.Mutex
	last *contents // what the current generation holds; nil before known
}

// contents are the bytes of one generation's files.
type contents struct {
	cert, key, bundle []byte
}

func (c *contents) equal(o *contents) bool {
	return c != nil && o != nil && bytes.Equal(c.cert, o.cert) && bytes.Equal(c.key, o.key) && bytes.Equal(c.bundle, o.bundle)
}

// New returns a Writer for opts. It touches nothing on disk.
func New(opts Options) (*Writer, error) {
	if opts.Dir == "" {
		return nil, errors.New("files: Options.Dir is required")
	}
	if opts.TrustDomain.IsZero() {
		return nil, errors.New("files: Options.TrustDomain is required: the trust domain of the SVID")
	}
	if opts.CertName == "" {
		opts.CertName = DefaultCertName
	}
	if opts.KeyName == "" {
		opts.KeyName = DefaultKeyName
	}
	if opts.BundleName == "" {
		opts.BundleName = DefaultBundleName
	}
	names := map[string]string{"CertName": opts.CertName, "KeyName": opts.KeyName, "BundleName": opts.BundleName}
	seen := map[string]string{}
	for _, field := range []string{"CertName", "KeyName", "BundleName"} {
		name := names[field]
		if name != filepath.Base(name) || name == "." || name == ".." || strings.HasPrefix(name, "..") {
			return nil, fmt.Errorf("files: Options.%s %q must be a plain file name, not starting with \"..\"", field, name)
		}
		if other, ok := seen[name]; ok {
			return nil, fmt.Errorf("files: Options.%s and %s are both %q", other, field, name)
		}
		seen[name] = field
	}
	if len(opts.Command) > 0 && opts.Command[0] == "" {
		return nil, errors.New("files: Options.Command names no program")
	}
	if opts.CommandTimeout < 0 {
		return nil, fmt.Errorf("files: Options.CommandTimeout is %s; want zero (%s) or more", opts.CommandTimeout, DefaultCommandTimeout)
	}
	if opts.CommandTimeout == 0 {
		opts.CommandTimeout = DefaultCommandTimeout
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	m, err := newMetrics(opts.Registerer)
	if err != nil {
		return nil, err
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("files: Options.Dir: %w", err)
	}
	return &Writer{
		dir:      dir,
		td:       opts.TrustDomain,
		certName: opts.CertName,
		keyName:  opts.KeyName,
		bdlName:  opts.BundleName,
		command:  opts.Command,
		timeout:  opts.CommandTimeout,
		log:      opts.Logger.With(slog.String("dir", dir)),
		metrics:  m,
	}, nil
}

// Run writes the source's SVID and bundle whenever they change, and runs
// the command after each write, until ctx is done; it returns ctx's
// error. While the source holds no valid SVID (none yet, or expired) the
// files are left as they are. A failed write is logged and retried.
func (w *Writer) Run(ctx context.Context, src Source) error {
	for {
		changed := src.Changed()
		var retry *time.Timer
		if err := w.update(ctx, src); err != nil {
			w.log.LogAttrs(ctx, slog.LevelError, "writing the certificate files failed; retrying",
				slog.Duration("retry_in", retryInterval), slog.Any("error", err))
			retry = time.NewTimer(retryInterval)
		}
		if !w.wait(ctx, changed, retry) {
			return fmt.Errorf("files: stopped: %w", ctx.Err())
		}
	}
}

// wait waits for changed, or retry when not nil, and reports false when
// ctx is done first.
func (w *Writer) wait(ctx context.Context, changed <-chan struct{}, retry *time.Timer) bool {
	var fire <-chan time.Time
	if retry != nil {
		defer retry.Stop()
		fire = retry.C
	}
	select {
	case <-ctx.Done():
		return false
	case <-changed:
	case <-fire:
	}
	return true
}

// update writes what src holds, when it holds a valid SVID, and runs the
// command when the files changed.
func (w *Writer) update(ctx context.Context, src Source) error {
	svid, err := src.GetX509SVID()
	if err != nil {
		return nil // nothing valid to write: keep the files as they are
	}
	bundle, err := src.GetX509BundleForTrustDomain(w.td)
	if err != nil {
		return fmt.Errorf("files: %w", err)
	}
	wrote, err := w.Write(svid, bundle)
	if err != nil || !wrote {
		return err
	}
	w.runCommand(ctx)
	return nil
}

// Write makes svid and bundle the files' content: a new generation,
// swapped in at once. It reports whether it wrote anything; it does not
// when the files already hold exactly this. It does not run the command.
func (w *Writer) Write(svid *x509svid.SVID, bundle *x509bundle.Bundle) (bool, error) {
	c, err := encode(svid, bundle)
	if err != nil {
		return false, err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.last == nil {
		// Once, at the first write: what an earlier run left.
		w.last, _ = w.read()
	}
	if c.equal(w.last) {
		return false, nil
	}
	gen, err := w.writeGeneration(c)
	if err != nil {
		w.metrics.writes.WithLabelValues("error").Inc()
		return false, err
	}
	w.last = c
	w.metrics.writes.WithLabelValues("ok").Inc()
	leaf := svid.Certificates[0]
	w.log.Info("certificate files written",
		slog.String("generation", gen),
		slog.String("spiffe_id", svid.ID.String()),
		slog.String("serial", leaf.SerialNumber.Text(16)),
		slog.Time("not_after", leaf.NotAfter),
		slog.Int("roots", len(bundle.X509Authorities())))
	return true, nil
}

// encode returns the files' bytes.
func encode(svid *x509svid.SVID, bundle *x509bundle.Bundle) (*contents, error) {
	if svid == nil || len(svid.Certificates) == 0 || svid.PrivateKey == nil {
		return nil, errors.New("files: the X509-SVID has no certificates or no private key")
	}
	if bundle == nil || len(bundle.X509Authorities()) == 0 {
		return nil, errors.New("files: the bundle has no X.509 authorities")
	}
	der, err := x509.MarshalPKCS8PrivateKey(svid.PrivateKey)
	if err != nil {
		return nil, fmt.Errorf("files: encoding the private key as PKCS#8: %w", err)
	}
	return &contents{
		cert:   pemutil.EncodeCertificates(svid.Certificates...),
		key:    pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}),
		bundle: pemutil.EncodeCertificates(bundle.X509Authorities()...),
	}, nil
}

// writeGeneration writes c as a new generation, swaps ..data to it, makes
// sure the top-level links exist, and removes generations older than the
// previous one. It returns the new generation's name.
func (w *Writer) writeGeneration(c *contents) (string, error) {
	if err := os.MkdirAll(w.dir, dirMode); err != nil {
		return "", fmt.Errorf("files: %w", err)
	}
	previous, _ := os.Readlink(filepath.Join(w.dir, DataLink))
	// MkdirTemp adds random digits: two generations in one second differ.
	genPath, err := os.MkdirTemp(w.dir, time.Now().UTC().Format("..2006_01_02_15_04_05."))
	if err != nil {
		return "", fmt.Errorf("files: %w", err)
	}
	gen := filepath.Base(genPath)
	ok := false
	defer func() {
		if !ok {
			_ = os.RemoveAll(genPath)
		}
	}()
	if err := os.Chmod(genPath, dirMode); err != nil {
		return "", fmt.Errorf("files: %w", err)
	}
	for _, f := range []struct {
		name string
		data []byte
		mode fs.FileMode
	}{
		{w.certName, c.cert, publicMode},
		{w.keyName, c.key, keyMode},
		{w.bdlName, c.bundle, publicMode},
	} {
		if err := writeSynced(filepath.Join(genPath, f.name), f.data, f.mode); err != nil {
			return "", err
		}
	}
	if err := syncDir(genPath); err != nil {
		return "", err
	}
	// The swap: one rename replaces the link.
	if err := replaceSymlink(gen, filepath.Join(w.dir, DataLink)); err != nil {
		return "", err
	}
	ok = true
	for _, name := range []string{w.certName, w.keyName, w.bdlName} {
		target := filepath.Join(DataLink, name)
		if cur, err := os.Readlink(filepath.Join(w.dir, name)); err == nil && cur == target {
			continue
		}
		if err := replaceSymlink(target, filepath.Join(w.dir, name)); err != nil {
			return gen, err
		}
	}
	if err := syncDir(w.dir); err != nil {
		return gen, err
	}
	w.removeOld(gen, previous)
	return gen, nil
}

// removeOld removes the generations other than current and previous.
func (w *Writer) removeOld(current, previous string) {
	entries, err := os.ReadDir(w.dir)
	if err != nil {
		w.log.Warn("listing old generations", slog.Any("error", err))
		return
	}
	for _, e := range entries {
		name := e.Name()
		if !e.IsDir() || !strings.HasPrefix(name, "..") || name == current || name == previous {
			continue
		}
		if err := os.RemoveAll(filepath.Join(w.dir, name)); err != nil {
			w.log.Warn("removing an old generation", slog.String("generation", name), slog.Any("error", err))
		}
	}
}

// read returns what the current generation holds.
func (w *Writer) read() (*contents, error) {
	gen, err := os.Readlink(filepath.Join(w.dir, DataLink))
	if err != nil {
		return nil, err
	}
	var c contents
	for _, f := range []struct {
		name string
		dst  *[]byte
	}{{w.certName, &c.cert}, {w.keyName, &c.key}, {w.bdlName, &c.bundle}} {
		if *f.dst, err = os.ReadFile(filepath.Join(w.dir, gen, f.name)); err != nil {
			return nil, err
		}
	}
	return &c, nil
}

// writeSynced creates path with data and mode, and syncs it.
func writeSynced(path string, data []byte, mode fs.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return fmt.Errorf("files: %w", err)
	}
	// The mode is set explicitly: the umask must not change it.
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return fmt.Errorf("files: %w", err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("files: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("files: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("files: %w", err)
	}
	return nil
}

// replaceSymlink makes link a symlink to target, atomically: a new link
// renamed over the old name, whatever file it named.
func replaceSymlink(target, link string) error {
	tmp := filepath.Join(filepath.Dir(link), ".."+filepath.Base(link)+".tmp")
	if strings.HasPrefix(filepath.Base(link), "..") {
		tmp = link + "_tmp"
	}
	_ = os.Remove(tmp)
	if err := os.Symlink(target, tmp); err != nil {
		return fmt.Errorf("files: %w", err)
	}
	if err := os.Rename(tmp, link); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("files: %w", err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("files: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("files: syncing %s: %w", dir, err)
	}
	return nil
}
