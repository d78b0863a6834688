package tokenreview_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	authenticationv1 "k8s.io/api/authentication/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/tokenreview"
)

var (
	td     = spiffeid.RequireTrustDomainFromString("example.org")
	demoID = spiffeid.RequireFromPath(td, "/ns/default/sa/demo")
	t0     = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	meshca = []string{"meshca"}
)

// errPrefix starts every error of the package.
const errPrefix = "tokenreview: "

func newAuthenticator(t *testing.T, api *fakeAPI, opts tokenreview.Options) *tokenreview.Authenticator {
	t.Helper()
	opts.TrustDomain = td
	if opts.Audiences == nil {
		opts.Audiences = meshca
	}
	if opts.Clock == nil {
		opts.Clock = api.clock
	}
	a, err := tokenreview.New(api.client.AuthenticationV1(), opts)
	require.NoError(t, err)
	return a
}

func requireAuthError(t *testing.T, err error, reason identity.AuthReason, msg string) {
	t.Helper()
	var ae *identity.AuthError
	require.ErrorAs(t, err, &ae)
	require.Equal(t, reason, ae.Reason)
	require.EqualError(t, err, errPrefix+msg)
}

func subjectOf(ns, sa, token string) string {
	h := sha256.Sum256([]byte(token))
	return "sa:" + ns + "/" + sa + " token-sha256:" + hex.EncodeToString(h[:4])
}

func TestNew(t *testing.T) {
	client := newFakeAPI(t, clocktesting.NewFakePassiveClock(t0)).client.AuthenticationV1()
	tests := []struct {
		name string
		opts tokenreview.Options
		err  string
	}{
		{"no trust domain", tokenreview.Options{Audiences: meshca}, "tokenreview: Options.TrustDomain is required"},
		{"no audience", tokenreview.Options{TrustDomain: td}, `tokenreview: Options.Audiences is required: the audience of the workloads' projected service-account tokens, such as "meshca"`},
		{"empty audience", tokenreview.Options{TrustDomain: td, Audiences: []string{"meshca", ""}}, "tokenreview: Options.Audiences has an empty audience"},
		{"negative timeout", tokenreview.Options{TrustDomain: td, Audiences: meshca, Timeout: -time.Second}, "tokenreview: Options.Timeout is -1s; it must be positive, or zero for 5s"},
		{"negative cache size", tokenreview.Options{TrustDomain: td, Audiences: meshca, MaxCacheEntries: -1}, "tokenreview: Options.MaxCacheEntries is -1; it must be positive, or zero for 100000"},
		{"negative MaxInFlight", tokenreview.Options{TrustDomain: td, Audiences: meshca, MaxInFlight: -1}, "tokenreview: Options.MaxInFlight is -1; it must be positive, or zero for 64"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := tokenreview.New(client, tt.opts)
			require.EqualError(t, err, tt.err)
		})
	}

	t.Run("no client", func(t *testing.T) {
		_, err := tokenreview.New(nil, tokenreview.Options{TrustDomain: td, Audiences: meshca})
		require.EqualError(t, err, "tokenreview: a TokenReviews client is required")
	})
	t.Run("metrics registered twice", func(t *testing.T) {
		reg := prometheus.NewRegistry()
		_, err := tokenreview.New(client, tokenreview.Options{TrustDomain: td, Audiences: meshca, Registerer: reg})
		require.NoError(t, err)
		_, err = tokenreview.New(client, tokenreview.Options{TrustDomain: td, Audiences: meshca, Registerer: reg})
		require.ErrorContains(t, err, "tokenreview: registering metrics: ")
	})
}

func TestAuthenticate(t *testing.T) {
	clk := clocktesting.NewFakePassiveClock(t0)
	exp := t0.Add(time.Hour)

	// status answers every review with st.
	status := func(st authenticationv1.TokenReviewStatus) func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
		return func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) { return &st, nil }
	}
	// user answers every review as authenticating username for meshca.
	user := func(username string) func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
		return status(authenticationv1.TokenReviewStatus{Authenticated: true, User: authenticationv1.UserInfo{Username: username}, Audiences: meshca})
	}
	fail := func(err error) func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
		return func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) { return nil, err }
	}
	tokenreviews := schema.GroupResource{Group: "authentication.k8s.io", Resource: "tokenreviews"}

	tests := []struct {
		name    string
		token   func(api *fakeAPI) string
		answer  func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error)
		reviews int
		reason  identity.AuthReason
		err     string
	}{{
		name:    "token for another audience",
		token:   func(api *fakeAPI) string { return api.issue("default", "demo", []string{"vault"}, exp) },
		reviews: 1,
		reason:  identity.ReasonUnknownToken,
		err:     `service-account token refused by the API server for audiences ["meshca"]: [invalid bearer token, token audiences ["vault"] is invalid for the target audiences ["meshca"]]`,
	}, {
		name:    "unknown token",
		token:   func(*fakeAPI) string { return newJWT(t, map[string]any{"exp": exp.Unix()}) },
		reviews: 1,
		reason:  identity.ReasonUnknownToken,
		err:     `service-account token refused by the API server for audiences ["meshca"]: [invalid bearer token, square/go-jose: error in cryptographic primitive]`,
	}, {
		// Refused by its own claim, with no review.
		name:   "expired token",
		token:  func(api *fakeAPI) string { return api.issue("default", "demo", meshca, t0.Add(-time.Second)) },
		reason: identity.ReasonUnknownToken,
		err:    "service-account token expired at 2026-03-01T11:59:59Z, by its exp claim; present a current token",
	}, {
		name:   "token expiring now",
		token:  func(api *fakeAPI) string { return api.issue("default", "demo", meshca, t0) },
		reason: identity.ReasonUnknownToken,
		err:    "service-account token expired at 2026-03-01T12:00:00Z, by its exp claim; present a current token",
	}, {
		// Refused by its claim even where the API server would accept
		// it (its clock is behind, or it allows a leeway).
		name:   "unknown expired token",
		token:  func(*fakeAPI) string { return newJWT(t, map[string]any{"exp": t0.Add(-time.Hour).Unix()}) },
		answer: user("system:serviceaccount:default:demo"),
		reason: identity.ReasonUnknownToken,
		err:    "service-account token expired at 2026-03-01T11:00:00Z, by its exp claim; present a current token",
	}, {
		name:    "refused without a message",
		token:   func(api *fakeAPI) string { return api.issue("default", "demo", meshca, exp) },
		answer:  status(authenticationv1.TokenReviewStatus{}),
		reviews: 1,
		reason:  identity.ReasonUnknownToken,
		err:     `service-account token refused by the API server for audiences ["meshca"]`,
	}, {
		name:    "API server that ignores audiences",
		token:   func(api *fakeAPI) string { return api.issue("default", "demo", meshca, exp) },
		answer:  status(authenticationv1.TokenReviewStatus{Authenticated: true, User: authenticationv1.UserInfo{Username: "system:serviceaccount:default:demo"}}),
		reviews: 1,
		reason:  identity.ReasonUnknownToken,
		err:     `token is valid for audiences [], none of ["meshca"]; present a projected service-account token with one of them`,
	}, {
		name:    "audiences answered that were not asked",
		token:   func(api *fakeAPI) string { return api.issue("default", "demo", meshca, exp) },
		answer:  status(authenticationv1.TokenReviewStatus{Authenticated: true, User: authenticationv1.UserInfo{Username: "system:serviceaccount:default:demo"}, Audiences: []string{"https://kubernetes.default.svc"}}),
		reviews: 1,
		reason:  identity.ReasonUnknownToken,
		err:     `token is valid for audiences ["https://kubernetes.default.svc"], none of ["meshca"]; present a projected service-account token with one of them`,
	}, {
		name:    "user token",
		token:   func(api *fakeAPI) string { return api.issueUser("alice@example.org", meshca, exp) },
		reviews: 1,
		reason:  identity.ReasonUnknownToken,
		err:     `token authenticates user "alice@example.org", not a service account; present a service-account token`,
	}, {
		name:    "node bootstrap token",
		token:   func(api *fakeAPI) string { return api.issue("default", "demo", meshca, exp) },
		answer:  user("system:bootstrap:abcdef"),
		reviews: 1,
		reason:  identity.ReasonUnknownToken,
		err:     `token authenticates user "system:bootstrap:abcdef", not a service account; present a service-account token`,
	}, {
		name:    "service account without a name",
		token:   func(api *fakeAPI) string { return api.issue("default", "demo", meshca, exp) },
		answer:  user("system:serviceaccount:default"),
		reviews: 1,
		reason:  identity.ReasonUnknownToken,
		err:     `token authenticates "system:serviceaccount:default", which is not system:serviceaccount:<namespace>:<name> with a valid namespace and name`,
	}, {
		name:    "service account with an empty namespace",
		token:   func(api *fakeAPI) string { return api.issue("default", "demo", meshca, exp) },
		answer:  user("system:serviceaccount::demo"),
		reviews: 1,
		reason:  identity.ReasonUnknownToken,
		err:     `token authenticates "system:serviceaccount::demo", which is not system:serviceaccount:<namespace>:<name> with a valid namespace and name`,
	}, {
		name:    "service account with a colon in its name",
		token:   func(api *fakeAPI) string { return api.issue("default", "demo", meshca, exp) },
		answer:  user("system:serviceaccount:default:demo:x"),
		reviews: 1,
		reason:  identity.ReasonUnknownToken,
		err:     `token authenticates "system:serviceaccount:default:demo:x", which is not system:serviceaccount:<namespace>:<name> with a valid namespace and name`,
	}, {
		name:    "service account with a path in its name",
		token:   func(api *fakeAPI) string { return api.issue("default", "demo", meshca, exp) },
		answer:  user("system:serviceaccount:default:../kube-system/sa/admin"),
		reviews: 1,
		reason:  identity.ReasonUnknownToken,
		err:     `token authenticates "system:serviceaccount:default:../kube-system/sa/admin", which is not system:serviceaccount:<namespace>:<name> with a valid namespace and name`,
	}, {
		name:    "namespace in capitals",
		token:   func(api *fakeAPI) string { return api.issue("default", "demo", meshca, exp) },
		answer:  user("system:serviceaccount:Default:demo"),
		reviews: 1,
		reason:  identity.ReasonUnknownToken,
		err:     `token authenticates "system:serviceaccount:Default:demo", which is not system:serviceaccount:<namespace>:<name> with a valid namespace and name`,
	}, {
		name:    "API server error",
		token:   func(api *fakeAPI) string { return api.issue("default", "demo", meshca, exp) },
		answer:  fail(apierrors.NewInternalError(errors.New("etcd is down"))),
		reviews: 1,
		reason:  identity.ReasonUnavailable,
		err:     "cannot reach the Kubernetes API server to review the token: Internal error occurred: etcd is down",
	}, {
		name:    "API server overloaded",
		token:   func(api *fakeAPI) string { return api.issue("default", "demo", meshca, exp) },
		answer:  fail(apierrors.NewTooManyRequests("too many requests", 1)),
		reviews: 1,
		reason:  identity.ReasonUnavailable,
		err:     "cannot reach the Kubernetes API server to review the token: too many requests",
	}, {
		name:    "not allowed to review tokens",
		token:   func(api *fakeAPI) string { return api.issue("default", "demo", meshca, exp) },
		answer:  fail(apierrors.NewForbidden(tokenreviews, "", errors.New(`User "system:serviceaccount:meshca:meshca" cannot create resource "tokenreviews"`))),
		reviews: 1,
		reason:  identity.ReasonUnavailable,
		err:     `the Kubernetes API server does not let meshca review tokens (its service account needs create on tokenreviews.authentication.k8s.io): tokenreviews.authentication.k8s.io is forbidden: User "system:serviceaccount:meshca:meshca" cannot create resource "tokenreviews"`,
	}, {
		name:   "static token",
		token:  func(*fakeAPI) string { return "0123456789abcdef-demo-token" },
		reason: identity.ReasonUnknownToken,
		err:    "bearer token is not a Kubernetes service-account token: it is not a JWT",
	}, {
		name:   "two segments",
		token:  func(*fakeAPI) string { return "eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjF9" },
		reason: identity.ReasonUnknownToken,
		err:    "bearer token is not a Kubernetes service-account token: it is not a JWT",
	}, {
		name:   "unsigned JWT",
		token:  func(*fakeAPI) string { return "eyJhbGciOiJub25lIn0.eyJleHAiOjF9.c2ln" },
		reason: identity.ReasonUnknownToken,
		err:    "bearer token is not a Kubernetes service-account token: it is not a JWT",
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			api := newFakeAPI(t, clk)
			api.answer(tt.answer)
			a := newAuthenticator(t, api, tokenreview.Options{})
			_, err := a.Authenticate(t.Context(), identity.Credential{Token: tt.token(api)})
			requireAuthError(t, err, tt.reason, tt.err)
			require.Equal(t, tt.reviews, api.reviews())
		})
	}

	t.Run("service-account token", func(t *testing.T) {
		api := newFakeAPI(t, clk)
		var spec authenticationv1.TokenReviewSpec
		api.answer(func(s authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
			spec = s
			return nil, nil
		})
		a := newAuthenticator(t, api, tokenreview.Options{Audiences: []string{"istio-ca", "meshca"}})
		token := api.issue("default", "demo", []string{"meshca", "vault"}, exp)
		caller, err := a.Authenticate(t.Context(), identity.Credential{Token: token})
		require.NoError(t, err)
		require.Equal(t, identity.Caller{ID: demoID, Method: "kubernetes_token", Subject: subjectOf("default", "demo", token)}, caller)
		require.Equal(t, authenticationv1.TokenReviewSpec{Token: token, Audiences: []string{"istio-ca", "meshca"}}, spec)
	})
	t.Run("service account with dots in its name", func(t *testing.T) {
		api := newFakeAPI(t, clk)
		a := newAuthenticator(t, api, tokenreview.Options{})
		token := api.issue("kube-system", "metrics.v2", meshca, exp)
		caller, err := a.Authenticate(t.Context(), identity.Credential{Token: token})
		require.NoError(t, err)
		require.Equal(t, spiffeid.RequireFromPath(td, "/ns/kube-system/sa/metrics.v2"), caller.ID)
	})
	t.Run("no token", func(t *testing.T) {
		api := newFakeAPI(t, clk)
		a := newAuthenticator(t, api, tokenreview.Options{})
		_, err := a.Authenticate(t.Context(), identity.Credential{})
		require.ErrorIs(t, err, identity.ErrNotApplicable)
		require.Zero(t, api.reviews())
	})
}

// TestChain checks the Authenticator's place after the static bootstrap
// tokens: each accepts its own tokens, and a token neither knows ends with
// this package's "unknown" refusal.
func TestChain(t *testing.T) {
	api := newFakeAPI(t, clocktesting.NewFakePassiveClock(t0))
	const static = "0123456789abcdef-demo-token"
	st, err := identity.NewStaticTokens(identity.TokenFile{Tokens: []identity.TokenFileEntry{{ID: demoID.String(), Token: static}}}, td)
	require.NoError(t, err)
	authn := identity.Chain(st, newAuthenticator(t, api, tokenreview.Options{}))

	caller, err := authn.Authenticate(t.Context(), identity.Credential{Token: static})
	require.NoError(t, err)
	require.Equal(t, identity.MethodBootstrapToken, caller.Method)

	token := api.issue("default", "demo", meshca, t0.Add(time.Hour))
	caller, err = authn.Authenticate(t.Context(), identity.Credential{Token: token})
	require.NoError(t, err)
	require.Equal(t, identity.Caller{ID: demoID, Method: "kubernetes_token", Subject: subjectOf("default", "demo", token)}, caller)

	_, err = authn.Authenticate(t.Context(), identity.Credential{Token: "not-a-bootstrap-token-either"})
	requireAuthError(t, err, identity.ReasonUnknownToken, "bearer token is not a Kubernetes service-account token: it is not a JWT")
	require.Equal(t, 1, api.reviews())
}

// TestSlowAPIServer checks that an API server that does not answer yields
// Unavailable after the timeout, not a hang.
func TestSlowAPIServer(t *testing.T) {
	api := newFakeAPI(t, clocktesting.NewFakePassiveClock(t0))
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	api.answer(func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
		// The fake clientset does not pass the context on: block as a
		// client would until its context ends, here until the test ends.
		<-release
		return nil, errors.New("released")
	})
	a := newAuthenticator(t, api, tokenreview.Options{Timeout: 50 * time.Millisecond})
	token := api.issue("default", "demo", meshca, t0.Add(time.Hour))

	// The review the first caller left is cancelled, so the second starts
	// its own; neither ends, the fake ignoring its context.
	for range 2 {
		err := authenticateOrHang(t, a, t.Context(), token)
		requireAuthError(t, err, identity.ReasonUnavailable, "cannot reach the Kubernetes API server to review the token: no answer within 50ms: context deadline exceeded")
	}

	t.Run("caller gives up first", func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		err := authenticateOrHang(t, a, ctx, token)
		require.ErrorIs(t, err, context.Canceled)
		var ae *identity.AuthError
		require.False(t, errors.As(err, &ae), "a caller's own cancellation is not the API server's fault: %v", err)
		require.EqualError(t, err, "tokenreview: waiting for the review of the token: context canceled")
	})
}

// TestUnresponsiveAPIServer checks, with client-go's real client, an API
// server that takes connections and never answers: the caller gets
// Unavailable, and the review itself ends at the timeout.
func TestUnresponsiveAPIServer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() {
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c) // and never a byte back
		}
	}()
	client, err := kubernetes.NewForConfig(&rest.Config{
		Host:            "https://" + ln.Addr().String(),
		BearerToken:     "the-ca-own-token",
		TLSClientConfig: rest.TLSClientConfig{Insecure: true},
	})
	require.NoError(t, err)
	reg := prometheus.NewRegistry()
	a, err := tokenreview.New(client.AuthenticationV1(), tokenreview.Options{TrustDomain: td, Audiences: meshca, Timeout: 100 * time.Millisecond, Registerer: reg})
	require.NoError(t, err)
	token := newJWT(t, map[string]any{"exp": time.Now().Add(time.Hour).Unix()})

	err = authenticateOrHang(t, a, t.Context(), token)
	var ae *identity.AuthError
	require.ErrorAs(t, err, &ae)
	require.Equal(t, identity.ReasonUnavailable, ae.Reason)
	require.ErrorContains(t, err, errPrefix+"cannot reach the Kubernetes API server to review the token: no answer within 100ms: ")
	require.ErrorIs(t, err, context.DeadlineExceeded)
	requireNoToken(t, err.Error(), token)

	// The review does not outlive its timeout: client-go honours the
	// context it is given.
	require.EventuallyWithT(t, func(collect *assert.CollectT) {
		assert.Equal(collect, 1.0, gather(t, reg)[`meshca_tokenreview_reviews_total{result="unavailable"}`])
	}, 30*time.Second, 10*time.Millisecond)
}

// authenticateOrHang fails the test when Authenticate has not returned
// long after every timeout in these tests: it detects a hang, it does not
// time the call.
func authenticateOrHang(t *testing.T, a *tokenreview.Authenticator, ctx context.Context, token string) error {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		_, err := a.Authenticate(ctx, identity.Credential{Token: token})
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(30 * time.Second):
		t.Fatal("Authenticate hung with an API server that does not answer")
		return nil
	}
}

func TestCache(t *testing.T) {
	authenticate := func(t *testing.T, a *tokenreview.Authenticator, token string) error {
		t.Helper()
		_, err := a.Authenticate(t.Context(), identity.Credential{Token: token})
		return err
	}

	t.Run("hit avoids a review", func(t *testing.T) {
		api := newFakeAPI(t, clocktesting.NewFakePassiveClock(t0))
		a := newAuthenticator(t, api, tokenreview.Options{})
		token := api.issue("default", "demo", meshca, t0.Add(time.Hour))
		for range 3 {
			caller, err := a.Authenticate(t.Context(), identity.Credential{Token: token})
			require.NoError(t, err)
			require.Equal(t, demoID, caller.ID)
		}
		require.Equal(t, 1, api.reviews())
	})

	t.Run("ends at the token's expiry", func(t *testing.T) {
		clk := clocktesting.NewFakePassiveClock(t0)
		api := newFakeAPI(t, clk)
		a := newAuthenticator(t, api, tokenreview.Options{CacheTTL: time.Hour})
		token := api.issue("default", "demo", meshca, t0.Add(30*time.Second))
		require.NoError(t, authenticate(t, a, token))
		clk.SetTime(t0.Add(30*time.Second - time.Nanosecond))
		require.NoError(t, authenticate(t, a, token))
		require.Equal(t, 1, api.reviews())
		clk.SetTime(t0.Add(30 * time.Second))
		requireAuthError(t, authenticate(t, a, token), identity.ReasonUnknownToken,
			"service-account token expired at 2026-03-01T12:00:30Z, by its exp claim; present a current token")
		require.Equal(t, 1, api.reviews())
	})

	t.Run("ends after CacheTTL", func(t *testing.T) {
		clk := clocktesting.NewFakePassiveClock(t0)
		api := newFakeAPI(t, clk)
		a := newAuthenticator(t, api, tokenreview.Options{})
		token := api.issue("default", "demo", meshca, t0.Add(time.Hour))
		require.NoError(t, authenticate(t, a, token))
		clk.SetTime(t0.Add(tokenreview.DefaultCacheTTL - time.Nanosecond))
		require.NoError(t, authenticate(t, a, token))
		require.Equal(t, 1, api.reviews())
		clk.SetTime(t0.Add(tokenreview.DefaultCacheTTL))
		require.NoError(t, authenticate(t, a, token))
		require.Equal(t, 2, api.reviews())
	})

	t.Run("token without exp ends after CacheTTL", func(t *testing.T) {
		clk := clocktesting.NewFakePassiveClock(t0)
		api := newFakeAPI(t, clk)
		a := newAuthenticator(t, api, tokenreview.Options{CacheTTL: 10 * time.Second})
		token := newJWT(t, map[string]any{"sub": "system:serviceaccount:default:demo"})
		api.answer(func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
			return &authenticationv1.TokenReviewStatus{Authenticated: true, User: authenticationv1.UserInfo{Username: "system:serviceaccount:default:demo"}, Audiences: meshca}, nil
		})
		require.NoError(t, authenticate(t, a, token))
		clk.SetTime(t0.Add(10*time.Second - time.Nanosecond))
		require.NoError(t, authenticate(t, a, token))
		require.Equal(t, 1, api.reviews())
		clk.SetTime(t0.Add(10 * time.Second))
		require.NoError(t, authenticate(t, a, token))
		require.Equal(t, 2, api.reviews())
	})

	t.Run("keeps working while the API server is down", func(t *testing.T) {
		clk := clocktesting.NewFakePassiveClock(t0)
		api := newFakeAPI(t, clk)
		a := newAuthenticator(t, api, tokenreview.Options{})
		token := api.issue("default", "demo", meshca, t0.Add(time.Hour))
		require.NoError(t, authenticate(t, a, token))
		api.answer(func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
			return nil, errors.New("dial tcp 10.96.0.1:443: connect: connection refused")
		})
		clk.SetTime(t0.Add(30 * time.Second))
		caller, err := a.Authenticate(t.Context(), identity.Credential{Token: token})
		require.NoError(t, err)
		require.Equal(t, demoID, caller.ID)

		other := api.issue("default", "other", meshca, t0.Add(time.Hour))
		requireAuthError(t, authenticate(t, a, other), identity.ReasonUnavailable,
			"cannot reach the Kubernetes API server to review the token: dial tcp 10.96.0.1:443: connect: connection refused")
		require.Equal(t, 2, api.reviews())
	})

	t.Run("refusals are not cached", func(t *testing.T) {
		api := newFakeAPI(t, clocktesting.NewFakePassiveClock(t0))
		a := newAuthenticator(t, api, tokenreview.Options{})
		token := api.issue("default", "demo", []string{"vault"}, t0.Add(time.Hour))
		require.Error(t, authenticate(t, a, token))
		require.Error(t, authenticate(t, a, token))
		require.Equal(t, 2, api.reviews())
	})

	t.Run("failures are not cached", func(t *testing.T) {
		api := newFakeAPI(t, clocktesting.NewFakePassiveClock(t0))
		a := newAuthenticator(t, api, tokenreview.Options{})
		token := api.issue("default", "demo", meshca, t0.Add(time.Hour))
		api.answer(func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
			return nil, apierrors.NewServiceUnavailable("the server is shutting down")
		})
		requireAuthError(t, authenticate(t, a, token), identity.ReasonUnavailable,
			"cannot reach the Kubernetes API server to review the token: the server is shutting down")
		api.answer(nil)
		require.NoError(t, authenticate(t, a, token))
		require.Equal(t, 2, api.reviews())
	})

	t.Run("evicts the least recently used", func(t *testing.T) {
		api := newFakeAPI(t, clocktesting.NewFakePassiveClock(t0))
		a := newAuthenticator(t, api, tokenreview.Options{MaxCacheEntries: 2})
		tokA := api.issue("default", "a", meshca, t0.Add(time.Hour))
		tokB := api.issue("default", "b", meshca, t0.Add(time.Hour))
		tokC := api.issue("default", "c", meshca, t0.Add(time.Hour))
		for _, step := range []struct {
			token   string
			reviews int
		}{
			{tokA, 1}, {tokB, 2}, {tokA, 2}, // A is now the most recently used
			{tokC, 3},            // evicts B
			{tokA, 3}, {tokC, 3}, // still cached
			{tokB, 4}, // reviewed again, evicting A
			{tokA, 5},
		} {
			require.NoError(t, authenticate(t, a, step.token))
			require.Equal(t, step.reviews, api.reviews())
		}
	})

	t.Run("off", func(t *testing.T) {
		api := newFakeAPI(t, clocktesting.NewFakePassiveClock(t0))
		a := newAuthenticator(t, api, tokenreview.Options{CacheTTL: -1})
		token := api.issue("default", "demo", meshca, t0.Add(time.Hour))
		require.NoError(t, authenticate(t, a, token))
		require.NoError(t, authenticate(t, a, token))
		require.Equal(t, 2, api.reviews())
	})

	t.Run("token expired by its claim during its review is not cached", func(t *testing.T) {
		clk := clocktesting.NewFakePassiveClock(t0)
		api := newFakeAPI(t, clk)
		a := newAuthenticator(t, api, tokenreview.Options{})
		// The API server accepts it (its clock is behind, or it allows a
		// leeway); its answer is used once.
		token := newJWT(t, map[string]any{"exp": t0.Add(time.Second).Unix()})
		api.answer(func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
			clk.SetTime(t0.Add(2 * time.Second))
			return &authenticationv1.TokenReviewStatus{Authenticated: true, User: authenticationv1.UserInfo{Username: "system:serviceaccount:default:demo"}, Audiences: meshca}, nil
		})
		require.NoError(t, authenticate(t, a, token))
		requireAuthError(t, authenticate(t, a, token), identity.ReasonUnknownToken,
			"service-account token expired at 2026-03-01T12:00:01Z, by its exp claim; present a current token")
		require.Equal(t, 1, api.reviews())
	})
}

// TestConcurrentReviews checks that a restart storm presenting one token
// many times at once costs one review.
func TestConcurrentReviews(t *testing.T) {
	api := newFakeAPI(t, clocktesting.NewFakePassiveClock(t0))
	release := make(chan struct{})
	api.answer(func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
		<-release
		return nil, nil
	})
	a := newAuthenticator(t, api, tokenreview.Options{Timeout: time.Minute})
	const callers = 50
	joins := awaitJoins(a, callers-1)
	token := api.issue("default", "demo", meshca, t0.Add(time.Hour))

	var wg sync.WaitGroup
	errs := make([]error, callers)
	ids := make([]spiffeid.ID, callers)
	for i := range callers {
		wg.Go(func() {
			caller, err := a.Authenticate(t.Context(), identity.Credential{Token: token})
			ids[i], errs[i] = caller.ID, err
		})
	}
	// Every caller but the first waits for the first one's review before
	// the API server answers it.
	joins(t)
	close(release)
	wg.Wait()
	for i := range callers {
		require.NoError(t, errs[i])
		require.Equal(t, demoID, ids[i])
	}
	require.Equal(t, 1, api.reviews())
}

// TestConcurrentRefusal checks that callers sharing a review share its
// refusal, and that it is not kept for the next one.
func TestConcurrentRefusal(t *testing.T) {
	api := newFakeAPI(t, clocktesting.NewFakePassiveClock(t0))
	release := make(chan struct{})
	api.answer(func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
		<-release
		return &authenticationv1.TokenReviewStatus{Error: "[invalid bearer token, service account token has been invalidated]"}, nil
	})
	a := newAuthenticator(t, api, tokenreview.Options{Timeout: time.Minute})
	errs := make([]error, 10)
	joins := awaitJoins(a, len(errs)-1)
	token := api.issue("default", "demo", meshca, t0.Add(time.Hour))

	var wg sync.WaitGroup
	for i := range errs {
		wg.Go(func() {
			_, errs[i] = a.Authenticate(t.Context(), identity.Credential{Token: token})
		})
	}
	joins(t)
	close(release)
	wg.Wait()
	for _, err := range errs {
		requireAuthError(t, err, identity.ReasonUnknownToken, `service-account token refused by the API server for audiences ["meshca"]: [invalid bearer token, service account token has been invalidated]`)
	}
	require.Equal(t, 1, api.reviews())
	_, err := a.Authenticate(t.Context(), identity.Credential{Token: token})
	require.Error(t, err)
	require.Equal(t, 2, api.reviews())
}

// awaitJoins returns a function that waits until n callers have joined a
// review under way, failing the test if they have not long after they
// should have.
func awaitJoins(a *tokenreview.Authenticator, n int) func(t *testing.T) {
	var (
		mu     sync.Mutex
		joined int
	)
	all := make(chan struct{})
	tokenreview.OnJoin(a, func() {
		mu.Lock()
		defer mu.Unlock()
		if joined++; joined == n {
			close(all)
		}
	})
	return func(t *testing.T) {
		t.Helper()
		select {
		case <-all:
		case <-time.After(30 * time.Second):
			mu.Lock()
			defer mu.Unlock()
			t.Fatalf("%d of %d callers joined the review under way", joined, n)
		}
	}
}

// TestTokenNeverLeaks drives every path with an API server that quotes the
// token back, and checks that no error or log line holds it or its
// signature.
func TestTokenNeverLeaks(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	clk := clocktesting.NewFakePassiveClock(t0)

	echo := func(tmpl string) func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
		return func(s authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
			return &authenticationv1.TokenReviewStatus{Error: strings.ReplaceAll(tmpl, "TOKEN", s.Token)}, nil
		}
	}
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	answers := map[string]func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error){
		"status quoting the token": echo("invalid bearer token TOKEN"),
		"status quoting the signature": func(s authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
			return &authenticationv1.TokenReviewStatus{Error: "bad signature " + s.Token[strings.LastIndex(s.Token, ".")+1:]}, nil
		},
		"error quoting the token": func(s authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
			return nil, apierrors.NewBadRequest("cannot decode " + s.Token)
		},
		"forbidden quoting the token": func(s authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
			return nil, apierrors.NewForbidden(schema.GroupResource{Group: "authentication.k8s.io", Resource: "tokenreviews"}, s.Token, errors.New("no"))
		},
		"user token": func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
			return &authenticationv1.TokenReviewStatus{Authenticated: true, User: authenticationv1.UserInfo{Username: "alice"}, Audiences: meshca}, nil
		},
		"no answer": func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
			<-release
			return nil, nil
		},
		"accepted": nil,
	}
	var tokens []string
	for name, answer := range answers {
		t.Run(name, func(t *testing.T) {
			// One API server each: one that does not answer holds the
			// fake clientset's lock.
			api := newFakeAPI(t, clk)
			api.answer(answer)
			a := newAuthenticator(t, api, tokenreview.Options{Logger: log, Timeout: 50 * time.Millisecond})
			token := api.issue("default", "demo", meshca, t0.Add(time.Hour))
			tokens = append(tokens, token)
			caller, err := a.Authenticate(t.Context(), identity.Credential{Token: token})
			if answer == nil {
				require.NoError(t, err)
				requireNoToken(t, fmt.Sprintf("%+v", caller), token)
				return
			}
			require.Error(t, err)
			requireNoToken(t, err.Error(), token)
			requireNoToken(t, fmt.Sprintf("%+v", err), token)
			for e := errors.Unwrap(err); e != nil; e = errors.Unwrap(e) {
				requireNoToken(t, e.Error(), token)
			}
			var ae *identity.AuthError
			require.ErrorAs(t, err, &ae)
			requireNoToken(t, ae.Error(), token)
		})
	}
	require.NotEmpty(t, logs.String())
	for _, token := range tokens {
		requireNoToken(t, logs.String(), token)
	}
}

func requireNoToken(t *testing.T, s, token string) {
	t.Helper()
	require.NotContains(t, s, token)
	require.NotContains(t, s, token[strings.LastIndex(token, ".")+1:])
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	api := newFakeAPI(t, clocktesting.NewFakePassiveClock(t0))
	a := newAuthenticator(t, api, tokenreview.Options{Registerer: reg})
	good := api.issue("default", "demo", meshca, t0.Add(time.Hour))
	bad := api.issue("default", "demo", []string{"vault"}, t0.Add(time.Hour))
	for _, token := range []string{good, good, good, bad} {
		_, _ = a.Authenticate(t.Context(), identity.Credential{Token: token})
	}
	api.answer(func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
		return nil, errors.New("connection refused")
	})
	_, _ = a.Authenticate(t.Context(), identity.Credential{Token: bad})

	require.Equal(t, map[string]float64{
		"meshca_tokenreview_cache_entries":                       1,
		"meshca_tokenreview_cache_hits_total":                    2,
		"meshca_tokenreview_in_flight":                           0,
		"meshca_tokenreview_overloaded_total":                    0,
		`meshca_tokenreview_reviews_total{result="accepted"}`:    1,
		`meshca_tokenreview_reviews_total{result="cancelled"}`:   0,
		`meshca_tokenreview_reviews_total{result="refused"}`:     1,
		`meshca_tokenreview_reviews_total{result="unavailable"}`: 1,
	}, gather(t, reg))
}

// gather returns the value of every metric of reg, by name and labels.
func gather(t *testing.T, reg prometheus.Gatherer) map[string]float64 {
	t.Helper()
	families, err := reg.Gather()
	require.NoError(t, err)
	values := make(map[string]float64)
	for _, f := range families {
		for _, m := range f.GetMetric() {
			name := f.GetName()
			for _, l := range m.GetLabel() {
				name += fmt.Sprintf("{%s=%q}", l.GetName(), l.GetValue())
			}
			switch {
			case m.GetCounter() != nil:
				values[name] = m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				values[name] = m.GetGauge().GetValue()
			}
		}
	}
	return values
}

// TestCredentialAudiences: each API of the server reviews tokens for its
// own audiences (identity.Credential.Audiences), so a token made for one
// API is no credential for another, even once it is cached for the first.
func TestCredentialAudiences(t *testing.T) {
	clk := clocktesting.NewFakePassiveClock(t0)
	api := newFakeAPI(t, clk)
	a := newAuthenticator(t, api, tokenreview.Options{})
	linkerd := []string{"identity.l5d.io"}
	exp := t0.Add(time.Hour)

	var mu sync.Mutex
	var sent [][]string
	api.answer(func(spec authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
		mu.Lock()
		defer mu.Unlock()
		sent = append(sent, spec.Audiences)
		return nil, nil
	})
	lastSent := func() []string {
		mu.Lock()
		defer mu.Unlock()
		return sent[len(sent)-1]
	}

	// A token for Linkerd only: accepted for Linkerd's audience, refused
	// for the default one, whatever the order.
	l5d := api.issue("default", "demo", linkerd, exp)
	caller, err := a.Authenticate(t.Context(), identity.Credential{Token: l5d, Audiences: linkerd})
	require.NoError(t, err)
	require.Equal(t, demoID, caller.ID)
	require.Equal(t, linkerd, lastSent())
	_, err = a.Authenticate(t.Context(), identity.Credential{Token: l5d})
	requireAuthError(t, err, identity.ReasonUnknownToken, `service-account token refused by the API server for audiences ["meshca"]: [invalid bearer token, token audiences ["identity.l5d.io"] is invalid for the target audiences ["meshca"]]`)
	require.Equal(t, meshca, lastSent())

	// A token for meshca, accepted and cached for the default audience,
	// is reviewed again, and refused, for Linkerd's.
	native := api.issue("default", "demo", meshca, exp)
	_, err = a.Authenticate(t.Context(), identity.Credential{Token: native})
	require.NoError(t, err)
	reviews := api.reviews()
	_, err = a.Authenticate(t.Context(), identity.Credential{Token: native})
	require.NoError(t, err)
	require.Equal(t, reviews, api.reviews(), "the second native call is served from the cache")
	_, err = a.Authenticate(t.Context(), identity.Credential{Token: native, Audiences: linkerd})
	requireAuthError(t, err, identity.ReasonUnknownToken, `service-account token refused by the API server for audiences ["identity.l5d.io"]: [invalid bearer token, token audiences ["meshca"] is invalid for the target audiences ["identity.l5d.io"]]`)
	require.Equal(t, reviews+1, api.reviews(), "the cache of another audience is not used")

	// An API server that answers with an audience not asked for proves
	// nothing for the credential's.
	api.answer(func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error) {
		return &authenticationv1.TokenReviewStatus{Authenticated: true, User: authenticationv1.UserInfo{Username: "system:serviceaccount:default:demo"}, Audiences: meshca}, nil
	})
	_, err = a.Authenticate(t.Context(), identity.Credential{Token: api.issue("default", "demo", meshca, exp), Audiences: linkerd})
	requireAuthError(t, err, identity.ReasonUnknownToken, `token is valid for audiences ["meshca"], none of ["identity.l5d.io"]; present a projected service-account token with one of them`)
}
