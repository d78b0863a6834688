package files_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/agent/files"
	"github.com/meshca/meshca/agent/internal/fake"
	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/internal/securefile"
	"github.com/meshca/meshca/testca"
)

var (
	td    = spiffeid.RequireTrustDomainFromString("example.org")
	webID = spiffeid.RequireFromPath(td, "/ns/shop/sa/web")
)

// timeout bounds every wait: a hang fails the test instead of blocking it.
const timeout = 20 * time.Second

func newWriter(t *testing.T, opts files.Options) *files.Writer {
	t.Helper()
	if opts.Dir == "" {
		opts.Dir = filepath.Join(t.TempDir(), "certs")
	}
	opts.TrustDomain = td
	w, err := files.New(opts)
	require.NoError(t, err)
	return w
}

func TestWriteLayout(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "certs")
	w := newWriter(t, files.Options{Dir: dir})
	root := testca.New(t, td)
	svid := root.ChildCA().CreateX509SVID(webID)

	wrote, err := w.Write(svid, root.Bundle())
	require.NoError(t, err)
	require.True(t, wrote)

	gen, err := os.Readlink(filepath.Join(dir, files.DataLink))
	require.NoError(t, err)
	require.Regexp(t, `^\.\.\d{4}_\d{2}_\d{2}_\d{2}_\d{2}_\d{2}\.\d+$`, gen)
	requireMode(t, filepath.Join(dir, gen), fs.ModeDir|0o755)
	requireMode(t, filepath.Join(dir, gen, "cert.pem"), 0o644)
	requireMode(t, filepath.Join(dir, gen, "key.pem"), 0o600)
	requireMode(t, filepath.Join(dir, gen, "bundle.pem"), 0o644)
	for _, name := range []string{"cert.pem", "key.pem", "bundle.pem"} {
		link, err := os.Readlink(filepath.Join(dir, name))
		require.NoError(t, err)
		require.Equal(t, filepath.Join(files.DataLink, name), link)
	}

	// What a program reading the files sees.
	got, err := x509svid.Load(filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"))
	require.NoError(t, err)
	require.Equal(t, svid.Certificates, got.Certificates, "the chain, leaf first")
	keyPEM, err := os.ReadFile(filepath.Join(dir, "key.pem"))
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(string(keyPEM), "-----BEGIN PRIVATE KEY-----\n"), "PKCS#8")
	bundle, err := x509bundle.Load(td, filepath.Join(dir, "bundle.pem"))
	require.NoError(t, err)
	require.Equal(t, []*x509.Certificate{root.Cert}, bundle.X509Authorities())

	// The same again writes nothing.
	wrote, err = w.Write(svid, root.Bundle())
	require.NoError(t, err)
	require.False(t, wrote)
	again, err := os.Readlink(filepath.Join(dir, files.DataLink))
	require.NoError(t, err)
	require.Equal(t, gen, again)

	// Load reads it back.
	loaded, err := w.Load()
	require.NoError(t, err)
	require.Equal(t, svid.Certificates, loaded.Certificates)
}

func TestWriteKeepsTheCurrentAndPreviousGenerations(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "certs")
	w := newWriter(t, files.Options{Dir: dir})
	root := testca.New(t, td)
	inter := root.ChildCA()
	var gens []string
	for range 5 {
		wrote, err := w.Write(inter.CreateX509SVID(webID), root.Bundle())
		require.NoError(t, err)
		require.True(t, wrote)
		gen, err := os.Readlink(filepath.Join(dir, files.DataLink))
		require.NoError(t, err)
		gens = append(gens, gen)
	}
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	require.ElementsMatch(t, []string{gens[3], gens[4], files.DataLink, "cert.pem", "key.pem", "bundle.pem"}, names)
}

// TestReadersNeverSeeAPartialOrMismatchedGeneration writes a hundred
// generations while readers read in a loop: through the top-level links,
// every file read is whole and parses; through ..data resolved once, the
// key always matches the certificate and the bundle verifies it.
func TestReadersNeverSeeAPartialOrMismatchedGeneration(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "certs")
	w := newWriter(t, files.Options{Dir: dir})
	roots := []*testca.CA{testca.New(t, td), testca.New(t, td)}
	inters := []*testca.CA{roots[0].ChildCA(), roots[1].ChildCA()}
	write := func(i int) {
		// Alternate roots, so a certificate paired with another
		// generation's bundle would not verify.
		_, err := w.Write(inters[i%2].CreateX509SVID(webID), roots[i%2].Bundle())
		require.NoError(t, err)
	}
	write(0)

	var (
		stop        atomic.Bool
		wg          sync.WaitGroup
		linkReads   atomic.Int64
		pairedReads atomic.Int64
		gone        atomic.Int64 // generations removed before a paired read finished
	)
	fail := make(chan error, 4)
	report := func(err error) {
		select {
		case fail <- err:
		default:
		}
		stop.Store(true)
	}
	// Reads each file through its top-level link.
	wg.Go(func() {
		for !stop.Load() {
			cert, err := os.ReadFile(filepath.Join(dir, "cert.pem"))
			if err != nil {
				report(err)
				return
			}
			if _, err := pemutil.ParseCertificates(cert); err != nil {
				report(errors.New("cert.pem: " + err.Error()))
				return
			}
			key, err := os.ReadFile(filepath.Join(dir, "key.pem"))
			if err != nil {
				report(err)
				return
			}
			if block, rest := pem.Decode(key); block == nil || len(rest) != 0 {
				report(errors.New("key.pem is not one whole PEM block"))
				return
			} else if _, err := x509.ParsePKCS8PrivateKey(block.Bytes); err != nil {
				report(errors.New("key.pem: " + err.Error()))
				return
			}
			bundle, err := os.ReadFile(filepath.Join(dir, "bundle.pem"))
			if err != nil {
				report(err)
				return
			}
			if _, err := pemutil.ParseCertificates(bundle); err != nil {
				report(errors.New("bundle.pem: " + err.Error()))
				return
			}
			linkReads.Add(1)
		}
	})
	// Resolves ..data once, then reads the three files of that
	// generation.
	wg.Go(func() {
		for !stop.Load() {
			gen, err := os.Readlink(filepath.Join(dir, files.DataLink))
			if err != nil {
				report(err)
				return
			}
			base := filepath.Join(dir, gen)
			cert, err1 := os.ReadFile(filepath.Join(base, "cert.pem"))
			key, err2 := os.ReadFile(filepath.Join(base, "key.pem"))
			bundlePEM, err3 := os.ReadFile(filepath.Join(base, "bundle.pem"))
			if err := errors.Join(err1, err2, err3); err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					// Removed, two generations later: read anew.
					gone.Add(1)
					continue
				}
				report(err)
				return
			}
			svid, err := x509svid.Parse(cert, key)
			if err != nil {
				report(errors.New(gen + ": " + err.Error()))
				return
			}
			roots, err := pemutil.ParseCertificates(bundlePEM)
			if err != nil {
				report(errors.New(gen + ": bundle: " + err.Error()))
				return
			}
			if _, _, err := x509svid.Verify(svid.Certificates, x509bundle.FromX509Authorities(td, roots)); err != nil {
				report(errors.New(gen + ": the bundle does not verify the certificate: " + err.Error()))
				return
			}
			pairedReads.Add(1)
		}
	})

	for i := 1; i <= 100 && !stop.Load(); i++ {
		write(i)
	}
	stop.Store(true)
	wg.Wait()
	select {
	case err := <-fail:
		t.Fatal(err)
	default:
	}
	require.Positive(t, linkReads.Load())
	require.Positive(t, pairedReads.Load())
	t.Logf("%d reads through the links, %d through ..data (%d retried: generation removed)", linkReads.Load(), pairedReads.Load(), gone.Load())
}

// logRecords is a slog handler that sends every message to a channel.
type logRecords chan slog.Record

func (l logRecords) Enabled(context.Context, slog.Level) bool { return true }
func (l logRecords) Handle(_ context.Context, r slog.Record) error {
	l <- r.Clone()
	return nil
}
func (l logRecords) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l logRecords) WithGroup(string) slog.Handler      { return l }

// next returns the next message logged.
func (l logRecords) next(t *testing.T) slog.Record {
	t.Helper()
	select {
	case r := <-l:
		return r
	case <-time.After(timeout):
		t.Fatal("nothing logged")
		return slog.Record{}
	}
}

func attr(r slog.Record, key string) string {
	var v string
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == key {
			v = a.Value.String()
			return false
		}
		return true
	})
	return v
}

func runWriter(t *testing.T, w *files.Writer, src files.Source) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx, src) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			require.ErrorIs(t, err, context.Canceled)
		case <-time.After(timeout):
			t.Error("Run did not return")
		}
	})
}

// TestRunRunsTheCommandAfterEachChange follows a source: each rotation
// and bundle change writes the files and then runs the command, which
// sees the new files; a notification that changed nothing the files hold
// writes nothing and runs nothing.
func TestRunRunsTheCommandAfterEachChange(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "certs")
	marker := filepath.Join(t.TempDir(), "marker")
	logs := make(logRecords, 100)
	reg := prometheus.NewRegistry()
	w := newWriter(t, files.Options{
		Dir: dir,
		// The command copies the certificate and bundle it is told of.
		Command:    []string{"sh", "-c", `cat "$MESHCA_CERT_FILE" "$MESHCA_BUNDLE_FILE" > "$MARKER"`},
		Logger:     slog.New(logs),
		Registerer: reg,
	})
	t.Setenv("MARKER", marker)
	root := testca.New(t, td)
	inter := root.ChildCA()
	src := fake.NewSource(root.Bundle())
	runWriter(t, w, src)

	// expect waits for a write and the command's run, and checks that the
	// command saw what was written.
	expect := func(svid *x509svid.SVID, bundle *x509bundle.Bundle) {
		t.Helper()
		r := logs.next(t)
		require.Equal(t, "certificate files written", r.Message)
		require.Equal(t, svid.Certificates[0].SerialNumber.Text(16), attr(r, "serial"))
		r = logs.next(t)
		require.Equal(t, "command run after the files changed", r.Message, attr(r, "output"))
		got, err := os.ReadFile(marker)
		require.NoError(t, err)
		want := string(pemutil.EncodeCertificates(svid.Certificates...)) + string(pemutil.EncodeCertificates(bundle.X509Authorities()...))
		require.Equal(t, want, string(got))
	}

	first := inter.CreateX509SVID(webID)
	src.WithSVID(first)
	expect(first, root.Bundle())

	second := inter.CreateX509SVID(webID)
	src.WithSVID(second)
	expect(second, root.Bundle())

	grown := x509bundle.FromX509Authorities(td, []*x509.Certificate{root.Cert, testca.New(t, td).Cert})
	src.WithBundle(grown)
	expect(second, grown)

	// Nothing the files hold changed: the next write is the next
	// rotation's.
	src.Notify()
	src.WithFederated(testca.New(t, spiffeid.RequireTrustDomainFromString("other.org")).Bundle())
	third := inter.CreateX509SVID(webID)
	src.WithSVID(third)
	expect(third, grown)

	require.Equal(t, 4.0, (counter(t, reg, "meshca_agent_files_writes_total", "ok")))
	require.Equal(t, 4.0, (counter(t, reg, "meshca_agent_files_command_runs_total", "ok")))
}

func TestCommandFailuresAreLoggedAndCounted(t *testing.T) {
	root := testca.New(t, td)
	inter := root.ChildCA()

	t.Run("exit status", func(t *testing.T) {
		logs := make(logRecords, 100)
		reg := prometheus.NewRegistry()
		w := newWriter(t, files.Options{
			Command:    []string{"sh", "-c", "echo reload failed >&2; exit 3"},
			Logger:     slog.New(logs),
			Registerer: reg,
		})
		src := fake.NewSource(root.Bundle()).WithSVID(inter.CreateX509SVID(webID))
		runWriter(t, w, src)
		require.Equal(t, "certificate files written", logs.next(t).Message)
		r := logs.next(t)
		require.Equal(t, "the command run after the files changed failed", r.Message)
		require.Equal(t, slog.LevelError, r.Level)
		require.Equal(t, "exit status 3", attr(r, "error"))
		require.Equal(t, "reload failed\n", attr(r, "output"))
		require.Equal(t, 1.0, (counter(t, reg, "meshca_agent_files_command_runs_total", "failed")))

		// The writer goes on.
		next := inter.CreateX509SVID(webID)
		src.WithSVID(next)
		r = logs.next(t)
		require.Equal(t, "certificate files written", r.Message)
		require.Equal(t, next.Certificates[0].SerialNumber.Text(16), attr(r, "serial"))
	})
	t.Run("timeout", func(t *testing.T) {
		logs := make(logRecords, 100)
		reg := prometheus.NewRegistry()
		w := newWriter(t, files.Options{
			// A child of the shell holds the output open: the whole
			// group is killed.
			Command:        []string{"sh", "-c", "echo started; sleep 600; echo never"},
			CommandTimeout: 200 * time.Millisecond,
			Logger:         slog.New(logs),
			Registerer:     reg,
		})
		src := fake.NewSource(root.Bundle()).WithSVID(inter.CreateX509SVID(webID))
		runWriter(t, w, src)
		require.Equal(t, "certificate files written", logs.next(t).Message)
		r := logs.next(t)
		require.Equal(t, "the command run after the files changed timed out and was killed", r.Message)
		require.Equal(t, "started\n", attr(r, "output"))
		require.Equal(t, 1.0, (counter(t, reg, "meshca_agent_files_command_runs_total", "timeout")))
	})
	t.Run("no such program", func(t *testing.T) {
		logs := make(logRecords, 100)
		w := newWriter(t, files.Options{Command: []string{"/nonexistent/reload"}, Logger: slog.New(logs)})
		runWriter(t, w, fake.NewSource(root.Bundle()).WithSVID(inter.CreateX509SVID(webID)))
		require.Equal(t, "certificate files written", logs.next(t).Message)
		r := logs.next(t)
		require.Equal(t, "the command run after the files changed failed", r.Message)
		require.Contains(t, attr(r, "error"), "no such file or directory")
	})
}

func TestRunRetriesAFailedWrite(t *testing.T) {
	parent := t.TempDir()
	blocker := filepath.Join(parent, "not-a-dir")
	require.NoError(t, os.WriteFile(blocker, nil, 0o600))
	logs := make(logRecords, 100)
	reg := prometheus.NewRegistry()
	w := newWriter(t, files.Options{Dir: filepath.Join(blocker, "certs"), Logger: slog.New(logs), Registerer: reg})
	root := testca.New(t, td)
	runWriter(t, w, fake.NewSource(root.Bundle()).WithSVID(root.ChildCA().CreateX509SVID(webID)))
	r := logs.next(t)
	require.Equal(t, "writing the certificate files failed; retrying", r.Message)
	require.Contains(t, attr(r, "error"), "not a directory")
	require.Equal(t, 1.0, (counter(t, reg, "meshca_agent_files_writes_total", "error")))
}

// TestARestartWritesNothingNew checks that a writer started on the files
// of an earlier run, with the same SVID (the agent serves them back as
// its initial SVID), writes nothing and runs no command.
func TestARestartWritesNothingNew(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "certs")
	root := testca.New(t, td)
	svid := root.ChildCA().CreateX509SVID(webID)
	_, err := newWriter(t, files.Options{Dir: dir}).Write(svid, root.Bundle())
	require.NoError(t, err)
	gen, err := os.Readlink(filepath.Join(dir, files.DataLink))
	require.NoError(t, err)

	w := newWriter(t, files.Options{Dir: dir})
	loaded, err := w.Load()
	require.NoError(t, err)
	wrote, err := w.Write(loaded, root.Bundle())
	require.NoError(t, err)
	require.False(t, wrote)
	again, err := os.Readlink(filepath.Join(dir, files.DataLink))
	require.NoError(t, err)
	require.Equal(t, gen, again)
}

func TestLoad(t *testing.T) {
	root := testca.New(t, td)
	svid := root.ChildCA().CreateX509SVID(webID)

	t.Run("nothing written", func(t *testing.T) {
		_, err := newWriter(t, files.Options{}).Load()
		require.ErrorIs(t, err, fs.ErrNotExist)
	})
	t.Run("plain files of another layout", func(t *testing.T) {
		dir := t.TempDir()
		key, err := x509.MarshalPKCS8PrivateKey(svid.PrivateKey)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(dir, "tls.crt"), pemutil.EncodeCertificates(svid.Certificates...), 0o644))
		require.NoError(t, securefile.WriteFile(filepath.Join(dir, "tls.key"), pemKey(key), 0o600))
		got, err := newWriter(t, files.Options{Dir: dir, CertName: "tls.crt", KeyName: "tls.key"}).Load()
		require.NoError(t, err)
		require.Equal(t, svid.Certificates, got.Certificates)
	})
	t.Run("key readable by others", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "certs")
		w := newWriter(t, files.Options{Dir: dir})
		_, err := w.Write(svid, root.Bundle())
		require.NoError(t, err)
		require.NoError(t, os.Chmod(filepath.Join(dir, files.DataLink, "key.pem"), 0o644))
		_, err = w.Load()
		require.ErrorIs(t, err, securefile.ErrTooOpen)
	})
	t.Run("key of another certificate", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "certs")
		w := newWriter(t, files.Options{Dir: dir})
		_, err := w.Write(svid, root.Bundle())
		require.NoError(t, err)
		other := root.ChildCA().CreateX509SVID(webID)
		key, err := x509.MarshalPKCS8PrivateKey(other.PrivateKey)
		require.NoError(t, err)
		require.NoError(t, securefile.WriteFile(filepath.Join(dir, files.DataLink, "key.pem"), pemKey(key), 0o600))
		_, err = w.Load()
		require.ErrorContains(t, err, "files: the X509-SVID in "+dir)
	})
}

func TestNewChecksOptions(t *testing.T) {
	for _, tt := range []struct {
		name string
		opts files.Options
		want string
	}{
		{"no dir", files.Options{TrustDomain: td}, "files: Options.Dir is required"},
		{"no trust domain", files.Options{Dir: "d"}, "files: Options.TrustDomain is required: the trust domain of the SVID"},
		{"a path for a name", files.Options{Dir: "d", TrustDomain: td, KeyName: "../key.pem"}, `files: Options.KeyName "../key.pem" must be a plain file name, not starting with ".."`},
		{"a generation's name", files.Options{Dir: "d", TrustDomain: td, CertName: "..data"}, `files: Options.CertName "..data" must be a plain file name, not starting with ".."`},
		{"one name twice", files.Options{Dir: "d", TrustDomain: td, BundleName: "cert.pem"}, `files: Options.CertName and BundleName are both "cert.pem"`},
		{"empty program", files.Options{Dir: "d", TrustDomain: td, Command: []string{""}}, "files: Options.Command names no program"},
		{"negative timeout", files.Options{Dir: "d", TrustDomain: td, CommandTimeout: -time.Second}, "files: Options.CommandTimeout is -1s; want zero (30s) or more"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			w, err := files.New(tt.opts)
			require.EqualError(t, err, tt.want)
			require.Nil(t, w)
		})
	}
}

func requireMode(t *testing.T, path string, want fs.FileMode) {
	t.Helper()
	info, err := os.Lstat(path)
	require.NoError(t, err)
	require.Equal(t, want, info.Mode(), path)
}

func pemKey(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// counter returns the value of the counter name{result=result}.
func counter(t *testing.T, reg *prometheus.Registry, name, result string) float64 {
	t.Helper()
	families, err := reg.Gather()
	require.NoError(t, err)
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "result" && l.GetValue() == result {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("no %s{result=%q}", name, result)
	return 0
}
