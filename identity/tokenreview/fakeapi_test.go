package tokenreview_test

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	authenticationv1 "k8s.io/api/authentication/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/utils/clock"
)

// fakeAPI is a Kubernetes API server's TokenReview endpoint, on client-go's
// fake clientset: it knows the tokens it issued, checks their audiences and
// expiry as the real one does, and can be scripted to answer otherwise.
type fakeAPI struct {
	t      *testing.T
	client *fake.Clientset
	clock  clock.PassiveClock
	calls  atomic.Int32

	mu     sync.Mutex
	issued map[string]issuedToken
	script func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error)
}

type issuedToken struct {
	user      string
	audiences []string
	exp       time.Time
}

func newFakeAPI(t *testing.T, clk clock.PassiveClock) *fakeAPI {
	api := &fakeAPI{t: t, client: fake.NewClientset(), clock: clk, issued: make(map[string]issuedToken)}
	api.client.PrependReactor("create", "tokenreviews", func(action k8stesting.Action) (bool, runtime.Object, error) {
		api.calls.Add(1)
		tr := action.(k8stesting.CreateAction).GetObject().(*authenticationv1.TokenReview)
		api.mu.Lock()
		script := api.script
		api.mu.Unlock()
		var (
			st  *authenticationv1.TokenReviewStatus
			err error
		)
		if script != nil {
			st, err = script(tr.Spec)
		}
		if st == nil && err == nil {
			st = api.review(tr.Spec)
		}
		if err != nil {
			return true, nil, err
		}
		out := tr.DeepCopy()
		out.Status = *st
		return true, out, nil
	})
	return api
}

// answer makes the API server answer with fn; a nil status and error from
// fn means the normal review.
func (api *fakeAPI) answer(fn func(authenticationv1.TokenReviewSpec) (*authenticationv1.TokenReviewStatus, error)) {
	api.mu.Lock()
	defer api.mu.Unlock()
	api.script = fn
}

// reviews is the number of TokenReviews received.
func (api *fakeAPI) reviews() int { return int(api.calls.Load()) }

// issue returns a new token of service account ns/sa, for audiences,
// expiring at exp.
func (api *fakeAPI) issue(ns, sa string, audiences []string, exp time.Time) string {
	return api.issueUser("system:serviceaccount:"+ns+":"+sa, audiences, exp)
}

func (api *fakeAPI) issueUser(user string, audiences []string, exp time.Time) string {
	tok := newJWT(api.t, map[string]any{"sub": user, "aud": audiences, "exp": exp.Unix()})
	api.mu.Lock()
	defer api.mu.Unlock()
	api.issued[tok] = issuedToken{user: user, audiences: audiences, exp: exp}
	return tok
}

// review is what kube-apiserver answers: the messages are its own.
func (api *fakeAPI) review(spec authenticationv1.TokenReviewSpec) *authenticationv1.TokenReviewStatus {
	api.mu.Lock()
	tok, ok := api.issued[spec.Token]
	api.mu.Unlock()
	switch {
	case !ok:
		return &authenticationv1.TokenReviewStatus{Error: "[invalid bearer token, square/go-jose: error in cryptographic primitive]"}
	case !api.clock.Now().Before(tok.exp):
		return &authenticationv1.TokenReviewStatus{Error: "[invalid bearer token, service account token has expired]"}
	}
	var auds []string
	for _, a := range spec.Audiences {
		if slices.Contains(tok.audiences, a) {
			auds = append(auds, a)
		}
	}
	if len(auds) == 0 {
		return &authenticationv1.TokenReviewStatus{Error: fmt.Sprintf("[invalid bearer token, token audiences %q is invalid for the target audiences %q]", tok.audiences, spec.Audiences)}
	}
	return &authenticationv1.TokenReviewStatus{
		Authenticated: true,
		User:          authenticationv1.UserInfo{Username: tok.user},
		Audiences:     auds,
	}
}

// newJWT returns a JWT-shaped token with claims, a unique "jti" and a
// random signature. Only the fake API server can tell it is genuine.
func newJWT(t testing.TB, claims map[string]any) string {
	t.Helper()
	claims["jti"] = rand.Text()
	header, err := json.Marshal(map[string]string{"alg": "RS256", "kid": "test"})
	require.NoError(t, err)
	payload, err := json.Marshal(claims)
	require.NoError(t, err)
	sig := make([]byte, 256)
	_, _ = rand.Read(sig)
	enc := base64.RawURLEncoding
	return enc.EncodeToString(header) + "." + enc.EncodeToString(payload) + "." + enc.EncodeToString(sig)
}
