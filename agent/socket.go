package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// staleProbeTimeout bounds the dial that tells a live socket from a stale
// one.
const staleProbeTimeout = time.Second

// unixListener is a listener on a Unix socket the agent created, which
// it removes when done.
type unixListener struct {
	net.Listener
	path string
	info fs.FileInfo // the socket file as created, to remove only it

	once sync.Once
}

// remove removes the socket file, unless another process has replaced it
// meanwhile, and closes the listener.
func (l *unixListener) remove() {
	l.once.Do(func() {
		_ = l.Close()
		if cur, err := os.Lstat(l.path); err == nil && os.SameFile(cur, l.info) {
			_ = os.Remove(l.path)
		}
	})
}

// listenUnix listens on a Unix socket at path with mode. The socket is
// created in a private temporary directory beside path, given its mode,
// and renamed to path: it is never reachable with a looser mode, no
// process-wide umask is touched, and a stale socket left by a crash is
// replaced in one step. A socket another process still serves on, and a
// file that is not a socket, are refused.
func listenUnix(path string, mode fs.FileMode) (*unixListener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("agent: socket directory: %w", err)
	}
	if info, err := os.Lstat(path); err == nil {
		if info.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("agent: %s exists and is not a socket; remove it or choose another socket path", path)
		}
		if conn, err := net.DialTimeout("unix", path, staleProbeTimeout); err == nil {
			conn.Close()
			return nil, fmt.Errorf("agent: another process is serving on %s; stop it or choose another socket path", path)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("agent: %w", err)
	}

	tmpDir, err := os.MkdirTemp(dir, ".meshca-agent-sock-")
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	defer os.RemoveAll(tmpDir)
	tmp := filepath.Join(tmpDir, "s")
	lis, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("agent: listening on %s: %w", path, err)
	}
	// The listener would unlink its temporary name on Close; the socket
	// lives at path, which remove unlinks.
	lis.SetUnlinkOnClose(false)
	fail := func(err error) (*unixListener, error) {
		lis.Close()
		return nil, fmt.Errorf("agent: listening on %s: %w", path, err)
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(err)
	}
	info, err := os.Lstat(path)
	if err != nil {
		return fail(err)
	}
	return &unixListener{Listener: lis, path: path, info: info}, nil
}
