package server_test

import (
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	securityv1alpha1 "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/ban"
	"github.com/meshca/meshca/identity/tokenreview"
	"github.com/meshca/meshca/internal/server"
	"github.com/meshca/meshca/internal/testlog"
	linkerdpb "github.com/meshca/meshca/proto/linkerd/identity"
	adminv1 "github.com/meshca/meshca/proto/meshca/admin/v1"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/testca"
)

// The bootstrap tokens of the ban tests: two namespaces whose names share
// a prefix.
var (
	shopID  = spiffeid.RequireFromPath(td, "/ns/shop/sa/web")
	shop2ID = spiffeid.RequireFromPath(td, "/ns/shop2/sa/web")
)

const (
	shopToken  = "shop-token-0123456789abcdef"
	shop2Token = "shop2-token-0123456789abcdef"
)

// banClock is the clock of the bans: tests move it to expire them.
type banClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *banClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *banClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// banHarness is a server with emergency bans and its admin API, both on
// real sockets, as meshca-server runs them.
type banHarness struct {
	*harness
	admin adminv1.AdminServiceClient
	audit *testlog.Buffer
	clock *banClock
	path  string
}

// startBans starts a server whose chain is meshca-server's (bootstrap
// tokens for demo, shop and shop2; authns; SVIDs), with bans kept in a
// file, and its admin API on a Unix socket.
func startBans(t *testing.T, authns ...identity.Authenticator) *banHarness {
	t.Helper()
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: td})
	require.NoError(t, err)
	c, err := ca.New(set, ca.Options{})
	require.NoError(t, err)
	tokens, err := identity.NewStaticTokens(identity.TokenFile{Tokens: []identity.TokenFileEntry{
		{ID: demoID.String(), Token: demoToken},
		{ID: shopID.String(), Token: shopToken},
		{ID: shop2ID.String(), Token: shop2Token},
	}}, td)
	require.NoError(t, err)
	clk := &banClock{now: time.Now()}
	path := filepath.Join(t.TempDir(), "bans.json")
	store, err := ban.NewFileStore(path)
	require.NoError(t, err)
	reg := prometheus.NewRegistry()
	bans, err := ban.New(context.Background(), ban.Options{Store: store, TrustDomain: td, Now: clk.Now, Registerer: reg})
	require.NoError(t, err)
	logs := &testlog.Buffer{}
	chain := append(append([]identity.Authenticator{tokens}, authns...), identity.NewSVIDAuthenticator(td, c, nil))
	srv, err := server.New(server.Options{
		CA:            c,
		Authenticator: identity.Chain(chain...),
		Policy:        identity.Policy{Reserved: []spiffeid.ID{serverID}},
		Logger:        slog.New(slog.NewJSONHandler(logs, nil)),
		Registerer:    reg,
		Istio:         server.IstioOptions{Enabled: true},
		Linkerd:       server.LinkerdOptions{Enabled: true},
		Bans:          bans,
	})
	require.NoError(t, err)
	serving, err := server.NewServingCert(c, serverID, []string{"localhost"}, nil, time.Hour, nil)
	require.NoError(t, err)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	g := srv.GRPCServer(serving.TLSConfig())
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)

	audit := &testlog.Buffer{}
	ag := server.NewAdminServer(server.AdminOptions{CA: c, Bans: bans, Logger: slog.New(slog.NewJSONHandler(audit, nil)),
		// A follower takes bans all the same.
		Leader: func() (bool, string) { return false, "meshca-other" }})
	socket := filepath.Join(t.TempDir(), "admin.sock")
	alis, err := net.Listen("unix", socket)
	require.NoError(t, err)
	go func() { _ = ag.Serve(alis) }()
	t.Cleanup(ag.Stop)
	conn, err := grpc.NewClient("unix:"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })

	bundle, _ := c.Bundle()
	h := &harness{t: t, srv: srv, ca: c, addr: lis.Addr().String(), logs: logs, reg: reg, bundle: bundle}
	return &banHarness{harness: h, admin: adminv1.NewAdminServiceClient(conn), audit: audit, clock: clk, path: path}
}

// banAdd bans target through the admin API.
func (h *banHarness) banAdd(target, reason string, ttl time.Duration) *adminv1.Ban {
	h.t.Helper()
	req := &adminv1.BanAddRequest{Target: target, Reason: reason, RequestedBy: "alice@laptop"}
	if ttl > 0 {
		req.Ttl = durationpb.New(ttl)
	}
	resp, err := h.admin.BanAdd(context.Background(), req)
	require.NoError(h.t, err)
	return resp.GetBan()
}

// signErr asks the native API for id's SVID and returns the error.
func (h *harness) signErr(ctx context.Context, conn *grpc.ClientConn, id spiffeid.ID) error {
	h.t.Helper()
	_, err := meshcav1.NewCertificateServiceClient(conn).Sign(ctx, &meshcav1.SignRequest{Csr: testca.CreateCSR(h.t, testca.NewKey(h.t), id.String())})
	return err
}

// istioErr asks Istio's API for id's certificate and returns the error.
func (h *harness) istioErr(ctx context.Context, conn *grpc.ClientConn, id spiffeid.ID) error {
	h.t.Helper()
	_, err := securityv1alpha1.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &securityv1alpha1.IstioCertificateRequest{Csr: istioCSR(h.t, testca.NewKey(h.t), id)})
	return err
}

// requireBanned checks a refusal for a ban: PermissionDenied naming the
// banned identity and the ban's reason.
func requireBanned(t *testing.T, err error, id spiffeid.ID, reason string) {
	t.Helper()
	st, ok := status.FromError(err)
	require.True(t, ok, "not a gRPC status: %v", err)
	require.Equal(t, codes.PermissionDenied, st.Code(), st.Message())
	require.Contains(t, st.Message(), `server: identity "`+id.String()+`" is banned`)
	require.Contains(t, st.Message(), `(reason: "`+reason+`"); no certificate is issued for it`)
}

// TestBanEveryFrontEnd: once banned through the admin API, a namespace
// gets no certificate from the native API, Istio's or Linkerd's (with
// service-account tokens reviewed by a real API server), nor by renewing
// over mTLS; each refusal is audited and metered with reason "banned".
// Other namespaces go on. Removing the ban lifts it.
func TestBanEveryFrontEnd(t *testing.T) {
	kc := kube.Cluster(t)
	reviews, err := tokenreview.New(kc.Client.AuthenticationV1(), tokenreview.Options{TrustDomain: td, Audiences: nativeAud})
	require.NoError(t, err)
	ns := kc.CreateNamespace(t, "banned-").Name
	kc.CreateServiceAccount(t, ns, "web")
	h := startBans(t, reviews)
	webID := spiffeid.RequireFromPath(td, "/ns/"+ns+"/sa/web")
	token := func(aud []string) string { return kc.Token(t, ns, "web", aud, time.Hour) }
	conn := h.conn(nil)

	// Before the ban: a certificate from each front end, and an SVID to
	// renew with later.
	webSVID, _ := h.sign(withToken(token(nativeAud)), conn, webID, 0)
	h.istioSign(withToken(token(istioAud)), conn, webID, 0)

	b := h.banAdd(ns, "INC-42: compromised", 0)
	require.Equal(t, "namespace", b.GetKind())
	// Who: what meshctl declares, and the user the kernel reports.
	require.Equal(t, fmt.Sprintf("alice@laptop (uid %d, pid %d)", os.Getuid(), os.Getpid()), b.GetCreatedBy())
	require.Nil(t, b.GetExpiresAt())

	requireBanned(t, h.signErr(withToken(token(nativeAud)), conn, webID), webID, "INC-42: compromised")
	requireBanned(t, h.istioErr(withToken(token(istioAud)), conn, webID), webID, "INC-42: compromised")
	name := linkerdName("web", ns)
	_, err = linkerdpb.NewIdentityClient(conn).Certify(context.Background(), &linkerdpb.CertifyRequest{
		Identity: name, Token: []byte(token(linkerdAud)),
		CertificateSigningRequest: linkerdCSR(t, testca.NewKey(t), &x509.CertificateRequest{DNSNames: []string{name}}),
	})
	requireBanned(t, err, webID, "INC-42: compromised")
	// Renewing with its current certificate is refused too, on both APIs
	// that take one.
	mtls := h.conn(webSVID)
	requireBanned(t, h.signErr(context.Background(), mtls, webID), webID, "INC-42: compromised")
	requireBanned(t, h.istioErr(context.Background(), mtls, webID), webID, "INC-42: compromised")
	require.Contains(t, status.Convert(h.signErr(context.Background(), mtls, webID)).Message(), `by the ban on namespace "`+ns+`"`)

	for api, n := range map[string]float64{"native": 3, "istio": 2, "linkerd": 1} {
		require.Equal(t, n, metricValue(t, h.reg, "meshca_requests_denied_total",
			map[string]string{"api": api, "code": "PermissionDenied", "reason": "banned"}), api)
	}
	logs := h.logs.String()
	for _, api := range []string{"native", "istio", "linkerd"} {
		require.Contains(t, logs, `"msg":"certificate request denied","audit":true,"api":"`+api+`"`)
	}
	require.Contains(t, logs, `"result":"denied","code":"PermissionDenied","reason":"banned"`)
	require.NotContains(t, logs, token(nativeAud))
	require.Equal(t, 1.0, metricValue(t, h.reg, "meshca_bans_in_force", map[string]string{}))

	// Others go on.
	h.sign(withToken(demoToken), conn, demoID, 0)
	h.istioSign(withToken(demoToken), conn, demoID, 0)

	// Lifted, the namespace gets certificates again.
	_, err = h.admin.BanRemove(context.Background(), &adminv1.BanRemoveRequest{Target: ns, RequestedBy: "bob"})
	require.NoError(t, err)
	h.sign(withToken(token(nativeAud)), conn, webID, 0)
	h.sign(context.Background(), mtls, webID, 0)
	audit := h.audit.String()
	require.Contains(t, audit, `"level":"WARN","msg":"admin step","audit":true,"api":"admin","step":"ban-add","target":"`+ns+`","reason":"INC-42: compromised","requested_by":"alice@laptop","caller":"uid `+strconv.Itoa(os.Getuid())+`, pid `+strconv.Itoa(os.Getpid())+`","kind":"namespace"`)
	require.Contains(t, audit, `"level":"WARN","msg":"admin step","audit":true,"api":"admin","step":"ban-remove","target":"`+ns+`","requested_by":"bob","caller":"uid `+strconv.Itoa(os.Getuid())+`, pid `+strconv.Itoa(os.Getpid())+`","result":"applied"`)
}

// TestBanNamespaceBySegments: a namespace ban covers every identity of
// the namespace and none of a namespace whose name it prefixes; an ID ban
// covers that ID only.
func TestBanNamespaceBySegments(t *testing.T) {
	h := startBans(t)
	conn := h.conn(nil)
	h.banAdd("shop", "INC-1", 0)
	requireBanned(t, h.signErr(withToken(shopToken), conn, shopID), shopID, "INC-1")
	h.sign(withToken(shop2Token), conn, shop2ID, 0)

	_, err := h.admin.BanRemove(context.Background(), &adminv1.BanRemoveRequest{Target: "shop"})
	require.NoError(t, err)
	h.banAdd(shop2ID.String(), "INC-2", 0)
	requireBanned(t, h.signErr(withToken(shop2Token), conn, shop2ID), shop2ID, "INC-2")
	h.sign(withToken(shopToken), conn, shopID, 0)
	h.sign(withToken(demoToken), conn, demoID, 0)
}

// TestBanExpires: a ban with a ttl lifts by itself when it expires.
func TestBanExpires(t *testing.T) {
	h := startBans(t)
	conn := h.conn(nil)
	b := h.banAdd(shopID.String(), "INC-3", 10*time.Minute)
	require.Equal(t, h.clock.Now().Add(10*time.Minute).Round(0).UTC(), b.GetExpiresAt().AsTime())
	err := h.signErr(withToken(shopToken), conn, shopID)
	requireBanned(t, err, shopID, "INC-3")
	require.Contains(t, status.Convert(err).Message(), "until "+b.GetExpiresAt().AsTime().Format(time.RFC3339))
	list, err := h.admin.BanList(context.Background(), &adminv1.BanListRequest{})
	require.NoError(t, err)
	require.Len(t, list.GetBans(), 1)

	h.clock.Add(10 * time.Minute)
	h.sign(withToken(shopToken), conn, shopID, 0)
	list, err = h.admin.BanList(context.Background(), &adminv1.BanListRequest{})
	require.NoError(t, err)
	require.Empty(t, list.GetBans())
}

// TestBanAdminRefusals: bad input to the ban commands is refused with the
// right code and a message saying what would be right, audited; nothing
// is banned.
func TestBanAdminRefusals(t *testing.T) {
	h := startBans(t)
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		req  *adminv1.BanAddRequest
		code codes.Code
		msg  string
	}{
		{"empty target", &adminv1.BanAddRequest{Reason: "x"}, codes.InvalidArgument,
			`ban: invalid ban: a target is required: a SPIFFE ID of trust domain "example.org" or a namespace name`},
		{"another trust domain", &adminv1.BanAddRequest{Target: "spiffe://other.example/ns/shop/sa/web", Reason: "x"}, codes.InvalidArgument,
			`ban: invalid ban: target "spiffe://other.example/ns/shop/sa/web" is not in trust domain "example.org", the only one this CA issues for`},
		{"the trust domain", &adminv1.BanAddRequest{Target: "spiffe://example.org", Reason: "x"}, codes.InvalidArgument,
			`ban: invalid ban: target "spiffe://example.org" is the trust domain itself; ban a workload's ID or a namespace`},
		{"garbage", &adminv1.BanAddRequest{Target: "../../etc/passwd", Reason: "x"}, codes.InvalidArgument,
			`ban: invalid ban: target "../../etc/passwd" is neither a SPIFFE ID (spiffe://example.org/...) nor a namespace name: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')`},
		{"bad SPIFFE ID", &adminv1.BanAddRequest{Target: "spiffe://example.org/a//b", Reason: "x"}, codes.InvalidArgument,
			`ban: invalid ban: target "spiffe://example.org/a//b" is not a SPIFFE ID: path cannot contain empty segments`},
		{"no reason", &adminv1.BanAddRequest{Target: "shop"}, codes.InvalidArgument,
			`ban: invalid ban: a reason is required (an incident, a ticket): it is audited and shown to the refused workloads`},
		{"negative ttl", &adminv1.BanAddRequest{Target: "shop", Reason: "x", Ttl: durationpb.New(-time.Minute)}, codes.InvalidArgument,
			`ban: invalid ban: the lifetime -1m0s is negative; zero means until removed`},
		{"invalid ttl", &adminv1.BanAddRequest{Target: "shop", Reason: "x", Ttl: &durationpb.Duration{Seconds: 1, Nanos: -1}}, codes.InvalidArgument,
			`ttl is not a valid duration (seconds and nanos in range, of one sign)`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := h.admin.BanAdd(ctx, tc.req)
			requireStatus(t, err, tc.code, tc.msg)
		})
	}
	_, err := h.admin.BanRemove(ctx, &adminv1.BanRemoveRequest{Target: "shop"})
	requireStatus(t, err, codes.NotFound, `ban: not banned: namespace "shop" has no ban in force`)
	_, err = h.admin.BanRemove(ctx, &adminv1.BanRemoveRequest{Target: "spiffe://other.example/x"})
	require.Equal(t, codes.InvalidArgument, status.Code(err))

	list, err := h.admin.BanList(ctx, &adminv1.BanListRequest{})
	require.NoError(t, err)
	require.Empty(t, list.GetBans())
	require.Equal(t, 10, strings.Count(h.audit.String(), `"level":"WARN","msg":"admin step refused"`))
	h.sign(withToken(shopToken), h.conn(nil), shopID, 0)

	// A server without bans refuses the commands.
	off := startAdmin(t, server.AdminOptions{})
	_, err = off.client.BanList(ctx, &adminv1.BanListRequest{})
	requireStatus(t, err, codes.FailedPrecondition, "bans are off on this server")
}
