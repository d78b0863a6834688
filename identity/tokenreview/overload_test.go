package tokenreview_test

import (
	"context"
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	authenticationv1client "k8s.io/client-go/kubernetes/typed/authentication/v1"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/tokenreview"
)

// hangingAPI is a TokenReviews client against an API server that does not
// answer until released: a review hangs until its context ends, as
// client-go's does, or until release is closed, when it is accepted as the
// token of default/demo. Unlike the fake clientset, it runs reviews
// concurrently.
type hangingAPI struct {
	release chan struct{}

	mu      sync.Mutex
	started int
	running int
	most    int                        // the most reviews running at once
	ctxs    map[string]context.Context // the context of each token's last review
}

func newHangingAPI() *hangingAPI {
	return &hangingAPI{release: make(chan struct{}), ctxs: make(map[string]context.Context)}
}

func (api *hangingAPI) TokenReviews() authenticationv1client.TokenReviewInterface { return api }

func (api *hangingAPI) Create(ctx context.Context, tr *authenticationv1.TokenReview, _ metav1.CreateOptions) (*authenticationv1.TokenReview, error) {
	api.mu.Lock()
	api.started++
	api.running++
	api.most = max(api.most, api.running)
	api.ctxs[tr.Spec.Token] = ctx
	api.mu.Unlock()
	defer func() {
		api.mu.Lock()
		api.running--
		api.mu.Unlock()
	}()
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-api.release:
		out := tr.DeepCopy()
		out.Status = authenticationv1.TokenReviewStatus{
			Authenticated: true,
			User:          authenticationv1.UserInfo{Username: "system:serviceaccount:default:demo"},
			Audiences:     tr.Spec.Audiences,
		}
		return out, nil
	}
}

// stats returns the reviews started so far and the most running at once.
func (api *hangingAPI) stats() (started, most int) {
	api.mu.Lock()
	defer api.mu.Unlock()
	return api.started, api.most
}

// reviewContext returns the context of token's last review.
func (api *hangingAPI) reviewContext(t *testing.T, token string) context.Context {
	t.Helper()
	api.mu.Lock()
	defer api.mu.Unlock()
	ctx, ok := api.ctxs[token]
	require.True(t, ok, "the token was never reviewed")
	return ctx
}

func newOverloadAuthenticator(t *testing.T, api *hangingAPI, maxInFlight int) (*tokenreview.Authenticator, prometheus.Gatherer) {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	a, err := tokenreview.New(api, tokenreview.Options{
		TrustDomain: td,
		Audiences:   meshca,
		MaxInFlight: maxInFlight,
		// Long enough that no review ends by the timeout in these tests:
		// one ends only when released or when its callers leave.
		Timeout:    time.Minute,
		Clock:      clocktesting.NewFakePassiveClock(t0),
		Registerer: reg,
	})
	require.NoError(t, err)
	return a, reg
}

// token returns a new made-up service-account token, not yet expired.
func token(t testing.TB) string {
	return newJWT(t, map[string]any{"sub": "system:serviceaccount:default:demo", "exp": t0.Add(time.Hour).Unix()})
}

// overloadedMsg is the refusal of a token while maxInFlight reviews are
// under way.
func overloadedMsg(maxInFlight string) string {
	return "too many service-account tokens under review (" + maxInFlight + " at once); retry later"
}

func isOverloaded(err error) bool {
	var ae *identity.AuthError
	return errors.As(err, &ae) && ae.Reason == tokenreview.ReasonOverloaded
}

// waitUntil polls cond, in this goroutine so that it does not count among
// the goroutines, until it holds, failing the test if it does not long
// after it should have.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("still waiting until %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestFlood checks that a flood of distinct made-up tokens, which no cache
// blunts, costs at most MaxInFlight reviews at once, that the rest are
// refused at once as overloaded, and that nothing is left running once the
// callers have left.
func TestFlood(t *testing.T) {
	const maxInFlight, callers = 8, 5000
	tokens := make([]string, callers)
	for i := range tokens {
		tokens[i] = token(t)
	}

	t.Run("callers leaving together", func(t *testing.T) {
		api := newHangingAPI()
		a, reg := newOverloadAuthenticator(t, api, maxInFlight)
		baseline := runtime.NumGoroutine()

		// The callers' deadline, ended by the test once the refusals are
		// in, so that the counts are exact.
		ctx, leave := context.WithCancel(t.Context())
		defer leave()
		var refused atomic.Int32
		errs := make([]error, callers)
		var wg sync.WaitGroup
		for i := range callers {
			wg.Go(func() {
				_, errs[i] = a.Authenticate(ctx, identity.Credential{Token: tokens[i]})
				if isOverloaded(errs[i]) {
					refused.Add(1)
				}
			})
		}
		// No review ends before the callers leave, and the timeout is a
		// minute: a refusal waits for neither.
		waitUntil(t, "all but MaxInFlight callers are refused", func() bool { return refused.Load() == callers-maxInFlight })
		started, _ := api.stats()
		require.Equal(t, maxInFlight, started)
		require.Equal(t, float64(maxInFlight), gather(t, reg)["meshca_tokenreview_in_flight"])

		leave()
		wg.Wait()
		var left int
		for _, err := range errs {
			if isOverloaded(err) {
				requireAuthError(t, err, tokenreview.ReasonOverloaded, overloadedMsg("8"))
				continue
			}
			left++
			require.EqualError(t, err, "tokenreview: waiting for the review of the token: context canceled")
		}
		require.Equal(t, maxInFlight, left)

		// Every review was cancelled when its caller left: none runs on to
		// the timeout, and no goroutine is left behind.
		waitUntil(t, "the goroutines are back to the baseline", func() bool { return runtime.NumGoroutine() <= baseline })
		started, most := api.stats()
		require.Equal(t, maxInFlight, started)
		require.Equal(t, maxInFlight, most)
		m := gather(t, reg)
		require.Equal(t, float64(callers-maxInFlight), m["meshca_tokenreview_overloaded_total"])
		require.Equal(t, float64(maxInFlight), m[`meshca_tokenreview_reviews_total{result="cancelled"}`])
		require.Zero(t, m[`meshca_tokenreview_reviews_total{result="unavailable"}`])
		require.Zero(t, m["meshca_tokenreview_in_flight"])

		// The places are free again.
		close(api.release)
		caller, err := a.Authenticate(t.Context(), identity.Credential{Token: token(t)})
		require.NoError(t, err)
		require.Equal(t, demoID, caller.ID)
	})

	t.Run("callers with short deadlines", func(t *testing.T) {
		api := newHangingAPI()
		a, reg := newOverloadAuthenticator(t, api, maxInFlight)
		baseline := runtime.NumGoroutine()

		errs := make([]error, callers)
		var wg sync.WaitGroup
		for i := range callers {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
				defer cancel()
				_, errs[i] = a.Authenticate(ctx, identity.Credential{Token: tokens[i]})
			})
		}
		wg.Wait()
		var refused, timedOut int
		for _, err := range errs {
			if isOverloaded(err) {
				refused++
				continue
			}
			timedOut++
			require.EqualError(t, err, "tokenreview: waiting for the review of the token: context deadline exceeded")
		}
		require.Equal(t, callers, refused+timedOut)

		waitUntil(t, "the goroutines are back to the baseline", func() bool { return runtime.NumGoroutine() <= baseline })
		started, most := api.stats()
		require.LessOrEqual(t, most, maxInFlight)
		// A caller whose deadline passed before it got its turn started
		// nothing.
		require.LessOrEqual(t, started, timedOut)
		m := gather(t, reg)
		require.Equal(t, float64(refused), m["meshca_tokenreview_overloaded_total"])
		require.Equal(t, float64(started), m[`meshca_tokenreview_reviews_total{result="cancelled"}`])
		require.Zero(t, m["meshca_tokenreview_in_flight"])
	})
}

// TestJoinWhileFull checks that a caller presenting a token already under
// review joins it even when no other review may start.
func TestJoinWhileFull(t *testing.T) {
	api := newHangingAPI()
	a, _ := newOverloadAuthenticator(t, api, 2)
	joins := awaitJoins(a, 2)
	tokA, tokB := token(t), token(t)

	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i, tok := range []string{tokA, tokB} {
		wg.Go(func() {
			_, errs[i] = a.Authenticate(t.Context(), identity.Credential{Token: tok})
		})
	}
	waitUntil(t, "both tokens are under review", func() bool { started, _ := api.stats(); return started == 2 })

	_, err := a.Authenticate(t.Context(), identity.Credential{Token: token(t)})
	requireAuthError(t, err, tokenreview.ReasonOverloaded, overloadedMsg("2"))

	for i, tok := range []string{tokA, tokB} {
		wg.Go(func() {
			_, errs[2+i] = a.Authenticate(t.Context(), identity.Credential{Token: tok})
		})
	}
	joins(t)
	close(api.release)
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	started, _ := api.stats()
	require.Equal(t, 2, started)
}

// TestCallersLeaving checks that a review goes on while a caller still
// waits for it, and is cancelled when the last one leaves.
func TestCallersLeaving(t *testing.T) {
	api := newHangingAPI()
	a, reg := newOverloadAuthenticator(t, api, 1)
	tok := token(t)

	// authenticate starts a caller, which leaves when its context is
	// cancelled, and returns its result.
	authenticate := func() (leave context.CancelFunc, result <-chan error) {
		ctx, leave := context.WithCancel(t.Context())
		t.Cleanup(leave)
		res := make(chan error, 1)
		go func() {
			_, err := a.Authenticate(ctx, identity.Credential{Token: tok})
			res <- err
		}()
		return leave, res
	}
	requireLeft := func(t *testing.T, result <-chan error) {
		t.Helper()
		select {
		case err := <-result:
			require.EqualError(t, err, "tokenreview: waiting for the review of the token: context canceled")
		case <-time.After(30 * time.Second):
			t.Fatal("a caller that left is still waiting")
		}
	}

	t.Run("a caller already gone starts nothing", func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		_, err := a.Authenticate(ctx, identity.Credential{Token: tok})
		require.EqualError(t, err, "tokenreview: waiting for the review of the token: context canceled")
		started, _ := api.stats()
		require.Zero(t, started)
	})

	t.Run("the last caller to leave cancels the review", func(t *testing.T) {
		joins := awaitJoins(a, 1)
		leave1, res1 := authenticate()
		waitUntil(t, "the token is under review", func() bool { started, _ := api.stats(); return started == 1 })
		leave2, res2 := authenticate()
		joins(t)

		leave1()
		requireLeft(t, res1)
		review := api.reviewContext(t, tok)
		require.NoError(t, review.Err(), "the review was cancelled while a caller still waits for it")

		leave2()
		requireLeft(t, res2)
		require.ErrorIs(t, review.Err(), context.Canceled)
		// Its place is free once the request has ended.
		waitUntil(t, "the cancelled review has ended", func() bool { return gather(t, reg)["meshca_tokenreview_in_flight"] == 0 })
		require.Equal(t, 1.0, gather(t, reg)[`meshca_tokenreview_reviews_total{result="cancelled"}`])
	})

	t.Run("a caller leaving does not fail the others", func(t *testing.T) {
		// The cancelled review is not joined: the token is reviewed anew.
		joins := awaitJoins(a, 1)
		leave3, res3 := authenticate()
		waitUntil(t, "the token is under review again", func() bool { started, _ := api.stats(); return started == 2 })
		_, res4 := authenticate()
		joins(t)
		leave3()
		requireLeft(t, res3)

		close(api.release)
		select {
		case err := <-res4:
			require.NoError(t, err)
		case <-time.After(30 * time.Second):
			t.Fatal("the caller still waiting was not answered")
		}
		started, _ := api.stats()
		require.Equal(t, 2, started)
	})
}
