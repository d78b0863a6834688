package kubetest

import (
	"github.com/meshca/meshca/internal/testproc"

	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

const (
	// Issuer is the issuer (iss) of the cluster's service-account tokens.
	Issuer = "https://kubernetes.default.svc.cluster.local"

	// AdminUser is the user Config authenticates as, in group system:masters.
	AdminUser = "kubetest-admin"

	// AssetsEnv names the folder holding the kube-apiserver and etcd
	// binaries (scripts/kube.sh fills it); unset, ~/.cache/meshca/kube.
	AssetsEnv = "MESHCA_KUBE_ASSETS"

	// SkipEnv, set to 1, skips the tests that need a cluster instead of
	// failing them when the binaries are missing. CI never sets it.
	SkipEnv = "MESHCA_SKIP_KUBE"
)

const (
	startTimeout = 2 * time.Minute // a loaded CI machine running -race tests
	stopGrace    = 5 * time.Second
	callTimeout  = 30 * time.Second
	logLines     = 40
	startTries   = 3 // free ports are picked, then bound: another may win
)

// apiAudiences are the audiences the API server accepts in tokens presented
// to itself (--api-audiences). meshca's audience is deliberately not one.
var apiAudiences = []string{Issuer, "kubernetes"}

// Cluster is a running kube-apiserver with its etcd, on 127.0.0.1.
type Cluster struct {
	// Config reaches the API server as AdminUser (system:masters), trusting
	// its serving CA. Copy it (rest.CopyConfig) before changing it.
	Config *rest.Config

	// Client is a clientset for Config.
	Client kubernetes.Interface

	// APIAudiences are the audiences the API server takes as its own
	// (--api-audiences): a TokenReview without audiences checks these.
	APIAudiences []string

	// ServiceAccountKey signs the cluster's service-account tokens (ES256,
	// issuer Issuer). Tests that need a token the API server will not
	// issue, such as an expired one, sign their own with it.
	ServiceAccountKey *ecdsa.PrivateKey

	dir       string
	etcd      *testproc.Process
	apiserver *testproc.Process
	stopOnce  sync.Once
}

// Start starts a cluster of the test's own and stops it, removing its files,
// when the test ends. It fails the test when the binaries are missing, and
// skips it only when SkipEnv is set to 1.
func Start(t testing.TB) *Cluster {
	t.Helper()
	skipIfOptedOut(t)
	c, err := start(t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kubetest: the cluster's logs, as the test failed:%s%s", c.apiserver.Tail(logLines), c.etcd.Tail(logLines))
		}
		c.stop()
	})
	return c
}

// Shared is one cluster shared by the tests of a package: declare one as a
// package variable, call Run from TestMain, and Cluster from each test. The
// cluster starts when a test first asks for it, so a run that selects no
// such test starts nothing. Safe for parallel tests.
type Shared struct {
	shared testproc.Shared[*Cluster]
}

// Run runs the package's tests (m.Run) and then stops the shared cluster, if
// one was started. It returns m.Run's exit code, so TestMain can end with
// either `s.Run(m)` or `os.Exit(s.Run(m))`.
func (s *Shared) Run(m *testing.M) int {
	return s.shared.Run(m, (*Cluster).stop)
}

// Cluster is the shared cluster, started on the first call. It fails the
// test when the cluster cannot start (every test that asks fails with the
// same reason) and skips it only when SkipEnv is set to 1.
func (s *Shared) Cluster(t testing.TB) *Cluster {
	t.Helper()
	skipIfOptedOut(t)
	return s.shared.Get(t, "kubetest: Shared.Cluster called outside Shared.Run: add `func TestMain(m *testing.M) { kube.Run(m) }` to the package's tests", start)
}

func skipIfOptedOut(t testing.TB) {
	t.Helper()
	if os.Getenv(SkipEnv) == "1" {
		t.Skip("kubetest: " + SkipEnv + "=1: skipping a test that needs a real Kubernetes API server")
	}
}

// assets returns the paths of the etcd and kube-apiserver binaries, or an
// error that says how to get them.
func assets() (etcd, apiserver string, err error) {
	dir := os.Getenv(AssetsEnv)
	if dir == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", "", fmt.Errorf("kubetest: %s is not set and there is no home folder: %w", AssetsEnv, err)
		}
		dir = filepath.Join(home, ".cache", "meshca", "kube")
	}
	var missing []string
	for _, name := range []string{"etcd", "kube-apiserver"} {
		info, err := os.Stat(filepath.Join(dir, name))
		if err != nil || info.IsDir() || info.Mode()&0o111 == 0 {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		return "", "", fmt.Errorf("kubetest: %s not found in %s (%s): run scripts/kube.sh (or make tools) to build them, "+
			"or set %s=1 to skip the tests that need a Kubernetes API server",
			strings.Join(missing, " and "), dir, AssetsEnv, SkipEnv)
	}
	return filepath.Join(dir, "etcd"), filepath.Join(dir, "kube-apiserver"), nil
}

// errPortTaken means a process could not bind a port picked as free.
var errPortTaken = errors.New("kubetest: a picked port was taken")

// start starts a cluster, trying again with new ports when one was taken
// between picking and binding it.
func start(logf func(format string, args ...any)) (*Cluster, error) {
	etcdBin, apiserverBin, err := assets()
	if err != nil {
		return nil, err
	}
	for try := 1; ; try++ {
		began := time.Now()
		c, err := startOnce(etcdBin, apiserverBin)
		if err == nil {
			logf("kubetest: kube-apiserver ready at %s in %s", c.Config.Host, time.Since(began).Round(time.Millisecond))
			return c, nil
		}
		if !errors.Is(err, errPortTaken) || try == startTries {
			return nil, err
		}
		logf("kubetest: %v; trying again with other ports", err)
	}
}

func startOnce(etcdBin, apiserverBin string) (_ *Cluster, err error) {
	dir, err := os.MkdirTemp("", "kubetest-")
	if err != nil {
		return nil, fmt.Errorf("kubetest: creating a temporary folder: %w", err)
	}
	c := &Cluster{dir: dir, APIAudiences: append([]string(nil), apiAudiences...)}
	defer func() {
		if err != nil {
			logs := c.apiserver.Tail(logLines) + c.etcd.Tail(logLines)
			if strings.Contains(logs, "address already in use") {
				err = fmt.Errorf("%w: %w", errPortTaken, err)
			}
			c.stop()
			err = fmt.Errorf("%w%s", err, logs)
		}
	}()

	files, err := c.writeFiles()
	if err != nil {
		return nil, err
	}
	ports, err := freePorts(3)
	if err != nil {
		return nil, err
	}
	clientURL := "http://127.0.0.1:" + strconv.Itoa(ports[0])
	peerURL := "http://127.0.0.1:" + strconv.Itoa(ports[1])
	securePort := ports[2]

	c.etcd, err = testproc.Start("etcd", etcdBin, []string{
		"--name=kubetest",
		"--data-dir=" + filepath.Join(dir, "etcd"),
		"--listen-client-urls=" + clientURL,
		"--advertise-client-urls=" + clientURL,
		"--listen-peer-urls=" + peerURL,
		"--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=kubetest=" + peerURL,
		"--initial-cluster-state=new",
	}, nil, filepath.Join(dir, "etcd.log"))
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if err := waitETCD(ctx, c.etcd, clientURL); err != nil {
		return nil, err
	}

	c.apiserver, err = testproc.Start("kube-apiserver", apiserverBin, []string{
		"--etcd-servers=" + clientURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(securePort),
		"--cert-dir=" + filepath.Join(dir, "certs"),
		"--tls-cert-file=" + files.servingCert,
		"--tls-private-key-file=" + files.servingKey,
		"--token-auth-file=" + files.tokens,
		"--authorization-mode=Node,RBAC",
		"--service-account-issuer=" + Issuer,
		"--service-account-key-file=" + files.saPublicKey,
		"--service-account-signing-key-file=" + files.saKey,
		"--service-account-extend-token-expiration=false",
		"--api-audiences=" + strings.Join(apiAudiences, ","),
		"--service-cluster-ip-range=10.0.0.0/24",
		// Pods need no existing service account: no controller manager
		// creates "default" here.
		"--disable-admission-plugins=ServiceAccount",
		"--allow-privileged=true",
		"--profiling=false",
	}, nil, filepath.Join(dir, "kube-apiserver.log"))
	if err != nil {
		return nil, err
	}
	if err := c.waitReady(ctx, "https://127.0.0.1:"+strconv.Itoa(securePort)); err != nil {
		return nil, err
	}
	return c, nil
}

// clusterFiles are the paths of the files the API server is started with.
type clusterFiles struct {
	servingCert, servingKey, tokens, saKey, saPublicKey string
}

// writeFiles makes the serving certificate, the admin token and the
// service-account key pair, writes them into the cluster's folder, and sets
// Config (but for its Host) and ServiceAccountKey.
func (c *Cluster) writeFiles() (*clusterFiles, error) {
	serving, err := newServingCert(time.Now())
	if err != nil {
		return nil, err
	}
	saKey, saKeyPEM, saPubPEM, err := newServiceAccountKey()
	if err != nil {
		return nil, err
	}
	c.ServiceAccountKey = saKey
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return nil, fmt.Errorf("kubetest: generating the admin token: %w", err)
	}
	token := hex.EncodeToString(raw)

	files := &clusterFiles{
		servingCert: filepath.Join(c.dir, "serving.crt"),
		servingKey:  filepath.Join(c.dir, "serving.key"),
		tokens:      filepath.Join(c.dir, "tokens.csv"),
		saKey:       filepath.Join(c.dir, "sa.key"),
		saPublicKey: filepath.Join(c.dir, "sa.pub"),
	}
	for path, data := range map[string][]byte{
		files.servingCert: serving.certPEM,
		files.servingKey:  serving.keyPEM,
		// token,user,uid,"group,..."
		files.tokens:      []byte(fmt.Sprintf("%s,%s,%s,\"system:masters\"\n", token, AdminUser, AdminUser)),
		files.saKey:       saKeyPEM,
		files.saPublicKey: saPubPEM,
	} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return nil, fmt.Errorf("kubetest: writing %s: %w", filepath.Base(path), err)
		}
	}

	c.Config = &rest.Config{
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAData: serving.caPEM},
		// Tests make many calls quickly; client-go's default is 5 a second.
		QPS:   200,
		Burst: 400,
	}
	return files, nil
}

// freePorts returns n distinct loopback ports that were free a moment ago.
func freePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("kubetest: picking a free port: %w", err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// waitETCD waits until etcd reports itself healthy.
func waitETCD(ctx context.Context, etcd *testproc.Process, clientURL string) error {
	client := &http.Client{Timeout: 2 * time.Second}
	var last string
	for {
		if done, err := etcd.Exited(); done {
			return fmt.Errorf("kubetest: etcd exited while starting: %w", testproc.ExitError(err))
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, clientURL+"/health", nil)
		if err != nil {
			return fmt.Errorf("kubetest: building the etcd health request: %w", err)
		}
		resp, err := client.Do(req)
		if err == nil {
			var body [256]byte
			n, _ := resp.Body.Read(body[:])
			resp.Body.Close()
			last = fmt.Sprintf("HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(body[:n])))
			if resp.StatusCode == http.StatusOK && strings.Contains(last, `"health":"true"`) {
				return nil
			}
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("kubetest: etcd not healthy after %s: %s", startTimeout, last)
		case <-etcd.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// waitReady sets Config.Host to host and Client, and waits until the API
// server's /readyz says it is ready.
func (c *Cluster) waitReady(ctx context.Context, host string) error {
	c.Config.Host = host
	client, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		return fmt.Errorf("kubetest: creating the clientset: %w", err)
	}
	c.Client = client

	var last string
	for {
		if done, err := c.apiserver.Exited(); done {
			return fmt.Errorf("kubetest: kube-apiserver exited while starting: %w", testproc.ExitError(err))
		}
		if done, err := c.etcd.Exited(); done {
			return fmt.Errorf("kubetest: etcd exited while kube-apiserver was starting: %w", testproc.ExitError(err))
		}
		callCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
		body, err := client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(callCtx)
		cancel()
		if err == nil {
			return nil
		}
		last = err.Error()
		if len(body) > 0 {
			last = string(body)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("kubetest: kube-apiserver not ready after %s: %s", startTimeout, last)
		case <-c.apiserver.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// stop stops kube-apiserver, then etcd, and removes the cluster's files.
func (c *Cluster) stop() {
	c.stopOnce.Do(func() {
		c.apiserver.Stop(stopGrace)
		c.etcd.Stop(stopGrace)
		_ = os.RemoveAll(c.dir)
	})
}

func (c *Cluster) ctx(t testing.TB) (context.Context, context.CancelFunc) {
	return context.WithTimeout(t.Context(), callTimeout)
}

// CreateNamespace creates a namespace and returns it. A name ending in "-"
// is a prefix: the API server appends a random suffix (generateName), which
// keeps tests sharing a cluster apart. Namespaces are not deleted after the
// test: with no controller manager they would stay Terminating anyway.
func (c *Cluster) CreateNamespace(t testing.TB, name string) *corev1.Namespace {
	t.Helper()
	ns := &corev1.Namespace{}
	if strings.HasSuffix(name, "-") {
		ns.GenerateName = name
	} else {
		ns.Name = name
	}
	ctx, cancel := c.ctx(t)
	defer cancel()
	created, err := c.Client.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("kubetest: creating namespace %q: %v", name, err)
	}
	return created
}

// CreateServiceAccount creates the service account ns/name and returns it.
func (c *Cluster) CreateServiceAccount(t testing.TB, ns, name string) *corev1.ServiceAccount {
	t.Helper()
	ctx, cancel := c.ctx(t)
	defer cancel()
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	created, err := c.Client.CoreV1().ServiceAccounts(ns).Create(ctx, sa, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("kubetest: creating service account %s/%s: %v", ns, name, err)
	}
	return created
}

// DeleteServiceAccount deletes the service account ns/name. Its tokens stop
// authenticating, though one reviewed successfully in the last 10 s may
// still pass until the API server's cache forgets it.
func (c *Cluster) DeleteServiceAccount(t testing.TB, ns, name string) {
	t.Helper()
	ctx, cancel := c.ctx(t)
	defer cancel()
	if err := c.Client.CoreV1().ServiceAccounts(ns).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
		t.Fatalf("kubetest: deleting service account %s/%s: %v", ns, name, err)
	}
}

// Token requests a token for the service account ns/sa (the TokenRequest
// API) for the given audiences, valid for ttl: at least 10 minutes, the API
// server's minimum; 0 takes its default of 1 hour.
func (c *Cluster) Token(t testing.TB, ns, sa string, audiences []string, ttl time.Duration) string {
	t.Helper()
	req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{Audiences: audiences}}
	if ttl != 0 {
		seconds := int64(ttl / time.Second)
		req.Spec.ExpirationSeconds = &seconds
	}
	ctx, cancel := c.ctx(t)
	defer cancel()
	resp, err := c.Client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("kubetest: requesting a token for %s/%s, audiences %q: %v", ns, sa, audiences, err)
	}
	return resp.Status.Token
}
