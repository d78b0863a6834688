package kubetest_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshca/meshca/internal/kubetest"
	"github.com/meshca/meshca/internal/testproc"
)

var kube kubetest.Shared

func TestMain(m *testing.M) { kube.Run(m) }

// review asks the API server whether token is valid for audiences.
func review(t *testing.T, c *kubetest.Cluster, token string, audiences []string) authenticationv1.TokenReviewStatus {
	t.Helper()
	got, err := tryReview(t, c, token, audiences)
	require.NoError(t, err)
	return got
}

func tryReview(t *testing.T, c *kubetest.Cluster, token string, audiences []string) (authenticationv1.TokenReviewStatus, error) {
	got, err := c.Client.AuthenticationV1().TokenReviews().Create(t.Context(), &authenticationv1.TokenReview{
		Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: audiences},
	}, metav1.CreateOptions{})
	if err != nil {
		return authenticationv1.TokenReviewStatus{}, err
	}
	return got.Status, nil
}

func TestTokenReview(t *testing.T) {
	c := kube.Cluster(t)
	ns := c.CreateNamespace(t, "tokenreview-").Name
	sa := c.CreateServiceAccount(t, ns, "workload")

	tests := []struct {
		name      string
		token     string
		audiences []string
		wantUser  string // "" when the token must not authenticate
	}{
		{
			name:      "token for meshca",
			token:     c.Token(t, ns, "workload", []string{"meshca"}, 10*time.Minute),
			audiences: []string{"meshca"},
			wantUser:  "system:serviceaccount:" + ns + ":workload",
		},
		{
			name:      "token for meshca among others",
			token:     c.Token(t, ns, "workload", []string{"vault", "meshca"}, time.Hour),
			audiences: []string{"meshca"},
			wantUser:  "system:serviceaccount:" + ns + ":workload",
		},
		{
			name:      "token for another audience",
			token:     c.Token(t, ns, "workload", []string{"other"}, 0),
			audiences: []string{"meshca"},
		},
		{
			name:      "token for meshca reviewed for the API server",
			token:     c.Token(t, ns, "workload", []string{"meshca"}, 0),
			audiences: nil, // the API server's own audiences
		},
		{
			name:      "not a token",
			token:     "garbage",
			audiences: []string{"meshca"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := review(t, c, tt.token, tt.audiences)
			if tt.wantUser == "" {
				require.False(t, got.Authenticated, "user %q", got.User.Username)
				return
			}
			require.True(t, got.Authenticated, "error %q", got.Error)
			require.Equal(t, tt.wantUser, got.User.Username)
			require.Equal(t, string(sa.UID), got.User.UID)
			require.Equal(t, []string{"meshca"}, got.Audiences)
		})
	}
}

func TestTokenOfDeletedServiceAccount(t *testing.T) {
	c := kube.Cluster(t)
	ns := c.CreateNamespace(t, "deleted-sa-").Name
	c.CreateServiceAccount(t, ns, "workload")
	token := c.Token(t, ns, "workload", []string{"meshca", "check"}, 0)

	// The API server caches a success for 10 s by token and audiences, so
	// the token is shown valid for "check", and tried after the deletion
	// for "meshca", which nothing has cached.
	require.True(t, review(t, c, token, []string{"check"}).Authenticated)
	c.DeleteServiceAccount(t, ns, "workload")

	// Its informer may lag behind the deletion: seconds on a loaded
	// machine.
	require.EventuallyWithT(t, func(collect *assert.CollectT) {
		got, err := tryReview(t, c, token, []string{"meshca"})
		if !assert.NoError(collect, err) {
			return
		}
		assert.False(collect, got.Authenticated, "user %q", got.User.Username)
	}, 30*time.Second, 100*time.Millisecond)
}

func TestStart(t *testing.T) {
	var c *kubetest.Cluster
	running := t.Run("running", func(t *testing.T) {
		c = kubetest.Start(t)
		version, err := c.Client.Discovery().ServerVersion()
		require.NoError(t, err)
		require.Equal(t, "v1.36.3", version.GitVersion, "scripts/kube.sh stamps the version")

		ns := c.CreateNamespace(t, "start")
		require.Equal(t, "start", ns.Name)
		c.CreateServiceAccount(t, "start", "workload")
		require.NotEmpty(t, c.Token(t, "start", "workload", []string{"meshca"}, 0))
	})
	if !running {
		return
	}
	// The subtest's cleanup has stopped the cluster.
	_, err := c.Client.Discovery().ServerVersion()
	require.ErrorContains(t, err, "connection refused")
}

// startWith runs kubetest.Start and reports how it ended.
func startWith(t *testing.T) *testproc.Outcome {
	return testproc.RunTB(t, "started a cluster", func(tb testing.TB) { kubetest.Start(tb) })
}

func TestStartWithoutBinaries(t *testing.T) {
	dir := t.TempDir()
	t.Setenv(kubetest.AssetsEnv, dir)

	t.Run("fails", func(t *testing.T) {
		t.Setenv(kubetest.SkipEnv, "")
		o := startWith(t)
		require.Empty(t, o.SkipMessage)
		require.Equal(t, "kubetest: etcd and kube-apiserver not found in "+dir+" (MESHCA_KUBE_ASSETS): "+
			"run scripts/kube.sh (or make tools) to build them, "+
			"or set MESHCA_SKIP_KUBE=1 to skip the tests that need a Kubernetes API server", o.FailMessage)
	})
	t.Run("skips when told to", func(t *testing.T) {
		t.Setenv(kubetest.SkipEnv, "1")
		o := startWith(t)
		require.Empty(t, o.FailMessage)
		require.Equal(t, "kubetest: MESHCA_SKIP_KUBE=1: skipping a test that needs a real Kubernetes API server", o.SkipMessage)
	})
}
