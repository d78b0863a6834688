package tokenreview_test

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/tokenreview"
)

// Kubernetes token authentication, for `go test -bench . ./identity/tokenreview`.
// Both benchmarks run against reviewEndpoint: an httptest server on
// loopback answering TokenReviews, through client-go's real REST client
// (JSON over HTTP/1.1). They are unit benchmarks: a miss measures this
// package, client-go and one loopback round trip, not the work of a real
// API server (a signature check, and an etcd read for a bound token).

// reviewEndpoint is the TokenReview endpoint of a Kubernetes API server
// that accepts every token as service account default/demo, for the
// audiences asked. It counts the reviews it answers.
type reviewEndpoint struct {
	srv     *httptest.Server
	reviews atomic.Int64
}

func newReviewEndpoint(b *testing.B) *reviewEndpoint {
	b.Helper()
	e := &reviewEndpoint{}
	e.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/apis/authentication.k8s.io/v1/tokenreviews" {
			http.NotFound(w, r)
			return
		}
		var tr authenticationv1.TokenReview
		if err := json.NewDecoder(r.Body).Decode(&tr); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		e.reviews.Add(1)
		tr.APIVersion, tr.Kind = "authentication.k8s.io/v1", "TokenReview"
		tr.Status = authenticationv1.TokenReviewStatus{
			Authenticated: true,
			User:          authenticationv1.UserInfo{Username: "system:serviceaccount:default:demo"},
			Audiences:     tr.Spec.Audiences,
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		_ = json.NewEncoder(w).Encode(&tr)
	}))
	b.Cleanup(e.srv.Close)
	return e
}

// authenticator returns an Authenticator reviewing through e, on a clock
// stopped at t0, so that no cache entry expires during a run.
func (e *reviewEndpoint) authenticator(b *testing.B) *tokenreview.Authenticator {
	b.Helper()
	// JSON, as the endpoint speaks no protobuf; QPS -1: no client-side
	// rate limit, which would measure itself.
	client, err := kubernetes.NewForConfig(&rest.Config{
		Host:          e.srv.URL,
		QPS:           -1,
		ContentConfig: rest.ContentConfig{ContentType: "application/json", AcceptContentTypes: "application/json"},
	})
	if err != nil {
		b.Fatal(err)
	}
	a, err := tokenreview.New(client.AuthenticationV1(), tokenreview.Options{
		TrustDomain: td,
		Audiences:   meshca,
		Clock:       clocktesting.NewFakePassiveClock(t0),
	})
	if err != nil {
		b.Fatal(err)
	}
	return a
}

// benchToken returns a service-account-shaped JWT, about 1 KiB like a real
// one, valid for an hour after t0.
func benchToken(b *testing.B) string {
	return newJWT(b, map[string]any{
		"sub": "system:serviceaccount:default:demo",
		"aud": meshca,
		"exp": t0.Add(time.Hour).Unix(),
		"iss": "https://kubernetes.default.svc.cluster.local",
		"kubernetes.io": map[string]any{
			"namespace":      "default",
			"serviceaccount": map[string]any{"name": "demo", "uid": "9e5f0c3a-7d3c-4e7b-9a57-2f6c9f1e7b10"},
			"pod":            map[string]any{"name": "demo-7d4b9c8f6d-x2x9q", "uid": "0b7e4b0e-3c1e-4d8f-a5a4-6f3e2d1c0b9a"},
		},
	})
}

func authenticateDemo(b *testing.B, ctx context.Context, a *tokenreview.Authenticator, token string) {
	caller, err := a.Authenticate(ctx, identity.Credential{Token: token})
	if err != nil {
		b.Fatal(err)
	}
	if caller.ID != demoID {
		b.Fatalf("authenticated %s; want %s", caller.ID, demoID)
	}
}

// BenchmarkAuthenticateCached authenticates a token already reviewed: the
// cache hit of every renewal that presents the same token within
// Options.CacheTTL. No review is sent in the loop.
func BenchmarkAuthenticateCached(b *testing.B) {
	e := newReviewEndpoint(b)
	a := e.authenticator(b)
	token := benchToken(b)
	ctx := context.Background()
	authenticateDemo(b, ctx, a, token) // the one review
	b.ReportAllocs()
	for b.Loop() {
		authenticateDemo(b, ctx, a, token)
	}
	if n := e.reviews.Load(); n != 1 {
		b.Fatalf("%d reviews sent; want 1, the rest from the cache", n)
	}
}

// BenchmarkAuthenticateMiss authenticates a token never seen before: a
// TokenReview sent to the endpoint and its answer cached. Each iteration's
// token differs from the others in its signature only, so making it costs
// next to nothing.
func BenchmarkAuthenticateMiss(b *testing.B) {
	e := newReviewEndpoint(b)
	a := e.authenticator(b)
	header, payload, sig, ok := cut3(benchToken(b))
	if !ok {
		b.Fatal("benchToken is not a JWT")
	}
	raw, err := base64.RawURLEncoding.DecodeString(sig)
	if err != nil {
		b.Fatal(err)
	}
	prefix := header + "." + payload + "."
	ctx := context.Background()
	var n uint64
	b.ReportAllocs()
	for b.Loop() {
		n++
		binary.BigEndian.PutUint64(raw, n)
		authenticateDemo(b, ctx, a, prefix+base64.RawURLEncoding.EncodeToString(raw))
	}
	if got := e.reviews.Load(); uint64(got) != n {
		b.Fatalf("%d reviews sent for %d tokens; want one each", got, n)
	}
}

// cut3 splits a JWT into its three segments.
func cut3(token string) (header, payload, sig string, ok bool) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return "", "", "", false
	}
	return parts[0], parts[1], parts[2], true
}
