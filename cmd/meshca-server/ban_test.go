package main_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshca/meshca/internal/kubetest"
)

// issueWith asks the server at addr for id's certificate with meshctl,
// authenticating with the token in tokenFile, and returns its stderr and
// error.
func issueWith(t *testing.T, addr, bundle, tokenFile, id string) (string, error) {
	t.Helper()
	_, stderr, err := meshctl(t, "issue", "--server", addr, "--ca-bundle", bundle,
		"--token-file", tokenFile, "--spiffe-id", id, "--out-dir", t.TempDir())
	return stderr, err
}

// TestBanSurvivesRestart: meshctl ban add through the admin socket stops
// the server issuing for a namespace at once; the ban is in
// <dataDir>/bans.json (0600) and still in force after a restart; remove
// lifts it, a ttl lifts it by itself, and bad input is refused.
func TestBanSurvivesRestart(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "data")
	srv, _ := startServer(t, "--data-dir", dataDir, "--demo")
	bundle := filepath.Join(dataDir, "bundle.pem")
	token := filepath.Join(dataDir, "demo-token")
	socket := filepath.Join(dataDir, "admin.sock")
	demo := "spiffe://meshca.local/ns/default/sa/demo"

	_, err := issueWith(t, srv.addr, bundle, token, demo)
	require.NoError(t, err)

	out, stderr, err := meshctl(t, "ban", "add", "default", "--reason", "INC-42: demo token leaked", "--admin-socket", socket)
	require.NoError(t, err, stderr)
	require.Equal(t, "banned namespace default, until removed\n", out)
	stderr, err = issueWith(t, srv.addr, bundle, token, demo)
	require.Error(t, err)
	require.Contains(t, stderr, "code = PermissionDenied")
	require.Contains(t, stderr, `identity "`+demo+`" is banned by the ban on namespace "default"`)
	srv.logs.WaitFor(t, `"reason":"banned"`)
	srv.logs.WaitFor(t, `"level":"WARN","msg":"admin step","audit":true,"api":"admin","step":"ban-add","target":"default"`)

	out, stderr, err = meshctl(t, "ban", "list", "--admin-socket", socket)
	require.NoError(t, err, stderr)
	require.Contains(t, out, "TARGET")
	require.Contains(t, out, "INC-42: demo token leaked")
	info, err := os.Stat(filepath.Join(dataDir, "bans.json"))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), info.Mode().Perm())

	// Restarted, the server still refuses.
	srv.stop()
	srv, _ = startServer(t, "--data-dir", dataDir, "--demo")
	srv.logs.WaitFor(t, `"bans_in_force":1`)
	stderr, err = issueWith(t, srv.addr, bundle, token, demo)
	require.Error(t, err)
	require.Contains(t, stderr, "code = PermissionDenied")
	out, stderr, err = meshctl(t, "ban", "list", "--admin-socket", socket, "-o", "json")
	require.NoError(t, err, stderr)
	var list struct {
		Bans []struct {
			Target, Kind, Reason, CreatedBy string
		}
	}
	require.NoError(t, json.Unmarshal([]byte(out), &list))
	require.Len(t, list.Bans, 1)
	require.Equal(t, "default", list.Bans[0].Target)
	require.Equal(t, "namespace", list.Bans[0].Kind)
	require.NotEmpty(t, list.Bans[0].CreatedBy)

	// Removed, the identity is issued again.
	out, stderr, err = meshctl(t, "ban", "remove", "default", "--admin-socket", socket)
	require.NoError(t, err, stderr)
	require.Equal(t, "ban lifted: namespace default\n", out)
	_, err = issueWith(t, srv.addr, bundle, token, demo)
	require.NoError(t, err)

	// A ban with a ttl lifts by itself.
	_, stderr, err = meshctl(t, "ban", "add", demo, "--reason", "INC-43", "--ttl", "2s", "--admin-socket", socket)
	require.NoError(t, err, stderr)
	stderr, err = issueWith(t, srv.addr, bundle, token, demo)
	require.Error(t, err, "banned until the ttl passes")
	require.Contains(t, stderr, "code = PermissionDenied")
	require.Eventually(t, func() bool { _, err := issueWith(t, srv.addr, bundle, token, demo); return err == nil }, 20*time.Second, 200*time.Millisecond)

	// Bad input.
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"spiffe://other.example/ns/default/sa/demo", "--reason", "x"}, `is not in trust domain "meshca.local"`},
		{[]string{"Not A Namespace", "--reason", "x"}, "is neither a SPIFFE ID"},
		{[]string{"", "--reason", "x"}, "a target is required"},
	} {
		_, stderr, err := meshctl(t, append(append([]string{"ban", "add"}, tc.args...), "--admin-socket", socket)...)
		require.Error(t, err)
		require.Contains(t, stderr, "code = InvalidArgument", tc.args)
		require.Contains(t, stderr, tc.msg)
	}
	_, stderr, err = meshctl(t, "ban", "add", "default", "--admin-socket", socket)
	require.Error(t, err)
	require.Contains(t, stderr, "--reason is required")
	srv.stop()
}

// TestBanFailsClosed: a server whose bans file cannot be read does not
// start: it would sign for banned identities.
func TestBanFailsClosed(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "data")
	require.NoError(t, os.MkdirAll(dataDir, 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(dataDir, "bans.json"), []byte(`{"version": 7}`), 0o600))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "meshca-server"), "--data-dir", dataDir,
		"--listen", "127.0.0.1:0", "--metrics-listen", "off")
	out, err := cmd.CombinedOutput()
	require.Error(t, err, "the server started without its bans")
	require.Contains(t, string(out), "emergency bans (refusing to start without them): ban: loading the bans: ban: stored bans have format version 7; this build reads version 1")
	require.NotContains(t, string(out), "meshca-server ready")
}

// TestBanKubernetes: two replicas against a real kube-apiserver. A ban
// taken on one replica (whichever leads) is enforced by the other within
// seconds, since both watch the bans Secret; removing it on the other
// lifts it on both; a ttl lifts it by itself.
func TestBanKubernetes(t *testing.T) {
	c := kubetest.Start(t)
	dir := t.TempDir()
	config := kubeModeConfig(t, c, dir, "")
	type replica struct {
		proc           *serverProc
		socket, bundle string
	}
	var rs []replica
	for _, name := range []string{"a", "b"} {
		data := filepath.Join(dir, name)
		proc, _ := startServerEnv(t, []string{"POD_NAME=meshca-" + name}, "--config", config, "--data-dir", data)
		rs = append(rs, replica{proc: proc, socket: filepath.Join(data, "admin.sock"), bundle: filepath.Join(data, "bundle.pem")})
	}
	a, b := rs[0], rs[1]

	app := c.CreateNamespace(t, "shop-").Name
	c.CreateServiceAccount(t, app, "web")
	webID := fmt.Sprintf("spiffe://meshca.local/ns/%s/sa/web", app)
	tokenFile := filepath.Join(dir, "token")
	require.NoError(t, os.WriteFile(tokenFile, []byte(c.Token(t, app, "web", []string{"meshca"}, time.Hour)), 0o600))
	for _, r := range rs {
		_, err := issueWith(t, r.proc.addr, r.bundle, tokenFile, webID)
		require.NoError(t, err)
	}
	refused := func(r replica) bool {
		stderr, err := issueWith(t, r.proc.addr, r.bundle, tokenFile, webID)
		return err != nil && strings.Contains(stderr, "code = PermissionDenied") && strings.Contains(stderr, "is banned")
	}

	_, stderr, err := meshctl(t, "ban", "add", app, "--reason", "INC-77", "--admin-socket", a.socket)
	require.NoError(t, err, stderr)
	added := time.Now()
	require.True(t, refused(a), "in force on the replica that took it when meshctl returns")
	require.Eventually(t, func() bool { return refused(b) }, 10*time.Second, 20*time.Millisecond)
	t.Logf("the ban taken on replica a was enforced by replica b %s after meshctl returned", time.Since(added).Round(time.Millisecond))
	b.proc.logs.WaitFor(t, `"msg":"bans updated from the store"`)

	out, stderr, err := meshctl(t, "ban", "remove", app, "--admin-socket", b.socket)
	require.NoError(t, err, stderr)
	require.Equal(t, "ban lifted: namespace "+app+"\n", out)
	require.Eventually(t, func() bool { return !refused(a) }, 10*time.Second, 20*time.Millisecond)

	_, stderr, err = meshctl(t, "ban", "add", webID, "--reason", "INC-78", "--ttl", "3s", "--admin-socket", b.socket)
	require.NoError(t, err, stderr)
	require.Eventually(t, func() bool { return refused(a) }, 10*time.Second, 20*time.Millisecond)
	require.Eventually(t, func() bool { return !refused(a) && !refused(b) }, 20*time.Second, 200*time.Millisecond, "expiry lifts the ban")

	// The bans live in their own Secret; the list is the same on both.
	out, stderr, err = meshctl(t, "ban", "list", "--admin-socket", a.socket)
	require.NoError(t, err, stderr)
	require.Equal(t, "no bans in force\n", out)
	_, err = c.Client.CoreV1().Secrets(caNamespace).Get(t.Context(), "meshca-bans", metav1.GetOptions{})
	require.NoError(t, err)
	a.proc.stop()
	b.proc.stop()
}
