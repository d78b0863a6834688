package main

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/internal/securefile"
	"github.com/meshca/meshca/internal/testlog"
)

// TestWatchTokenFile: a changed bootstrap token file replaces the tokens
// accepted, the demo token staying; a changed file that is refused (a bad
// entry, or readable by others) leaves the tokens in use, and the log
// never quotes a token.
func TestWatchTokenFile(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("meshca.local")
	id := spiffeid.RequireFromPath(td, "/ns/vm/sa/api")
	path := filepath.Join(t.TempDir(), "tokens.yaml")
	write := func(token string, mode os.FileMode) {
		t.Helper()
		doc := "tokens:\n- id: " + id.String() + "\n  token: " + token + "\n"
		require.NoError(t, securefile.WriteFile(path, []byte(doc), mode))
		// A later modification time, whatever the file system's
		// granularity.
		later := time.Now().Add(time.Duration(len(token)) * time.Second)
		require.NoError(t, os.Chtimes(path, later, later))
	}
	const first, second, demo = "first-token-0123456789", "second-token-0123456789", "demo-token-0123456789"
	write(first, 0o600)
	cfg := &completeConfig{Config: Config{BootstrapTokens: path}, td: td}
	file, err := tokenFile(cfg, demo)
	require.NoError(t, err)
	st, err := identity.NewStaticTokens(file, td)
	require.NoError(t, err)
	logs := &testlog.Buffer{}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() {
		defer close(done)
		watchTokenFile(ctx, cfg, st, demo, slog.New(slog.NewJSONHandler(logs, nil)), 20*time.Millisecond)
	}()
	defer func() { cancel(); <-done }()
	accepted := func(token string) bool {
		_, err := st.Authenticate(context.Background(), identity.Credential{Token: token})
		return err == nil
	}
	require.True(t, accepted(first))
	require.True(t, accepted(demo))

	write(second, 0o600)
	require.Eventually(t, func() bool { return accepted(second) }, 10*time.Second, 10*time.Millisecond)
	require.False(t, accepted(first), "a token taken out of the file is refused")
	require.True(t, accepted(demo), "the demo token stays")
	require.Contains(t, logs.String(), `"msg":"bootstrap token file reloaded"`)

	// A bad entry: refused, the tokens in use stay.
	write("short", 0o600)
	require.Eventually(t, func() bool { return strings.Contains(logs.String(), "token is shorter than 16 characters") }, 10*time.Second, 10*time.Millisecond)
	require.True(t, accepted(second))
	// Readable by others: refused too.
	write("third-token-0123456789xyz", 0o644)
	require.Eventually(t, func() bool { return strings.Count(logs.String(), "was not loaded") == 2 }, 10*time.Second, 10*time.Millisecond)
	require.True(t, accepted(second))
	require.False(t, accepted("third-token-0123456789xyz"))
	for _, token := range []string{first, second, demo, "third-token-0123456789xyz"} {
		require.NotContains(t, logs.String(), token)
	}
}
