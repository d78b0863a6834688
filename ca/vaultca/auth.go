package vaultca

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	vault "github.com/hashicorp/vault/api"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/securefile"
)

// refreshShare: a token is renewed, or replaced by a new login, once less
// than this share of its TTL is left.
const refreshShare = 3

// token is a Vault token and what is known of its life.
type token struct {
	value     string
	ttl       time.Duration // zero: it does not expire, or it is not known
	expires   time.Time     // when ttl is set
	renewable bool
}

// authMethod checks Config.Auth and returns the function that gets a
// token by it.
func (u *Upstream) authMethod() (func(context.Context) (token, error), error) {
	a := u.cfg.Auth
	set := 0
	for _, ok := range []bool{a.Token != "", a.TokenFile != "", a.Kubernetes != nil} {
		if ok {
			set++
		}
	}
	if set != 1 {
		return nil, errors.New("vaultca: set exactly one of Auth.Token, Auth.TokenFile and Auth.Kubernetes")
	}
	switch {
	case a.Token != "":
		return func(ctx context.Context) (token, error) { return u.lookup(ctx, a.Token) }, nil
	case a.TokenFile != "":
		return func(ctx context.Context) (token, error) {
			data, err := securefile.ReadPrivate(a.TokenFile)
			if err != nil {
				return token{}, fmt.Errorf("vaultca: reading the Vault token file: %w", err)
			}
			value := string(bytes.TrimSpace(data))
			if value == "" {
				return token{}, fmt.Errorf("vaultca: the Vault token file %s is empty", a.TokenFile)
			}
			return u.lookup(ctx, value)
		}, nil
	}
	k := *a.Kubernetes
	if k.Role == "" {
		return nil, errors.New("vaultca: Auth.Kubernetes.Role is required")
	}
	k.Mount = strings.Trim(k.Mount, "/")
	if k.Mount == "" {
		k.Mount = DefaultKubernetesMount
	}
	if k.TokenFile == "" {
		k.TokenFile = DefaultKubernetesTokenFile
	}
	return func(ctx context.Context) (token, error) { return u.kubernetesLogin(ctx, k) }, nil
}

// canLogInAgain reports whether a new login may bring a different token:
// a token file may have been rewritten, a Kubernetes login gives a new
// token; a fixed token stays what it is.
func (u *Upstream) canLogInAgain() bool { return u.cfg.Auth.Token == "" }

// lookup learns the life of a token it was given (auth/token/lookup-self,
// which Vault's default policy allows). When Vault refuses the lookup
// (a policy without it, or a bad token: Vault does not say which), the
// token is used as it is, its life unknown, and the request it is for
// says whether Vault takes it.
func (u *Upstream) lookup(ctx context.Context, value string) (token, error) {
	u.client.SetToken(value)
	secret, err := u.client.Auth().Token().LookupSelfWithContext(ctx)
	if err != nil {
		var re *vault.ResponseError
		if errors.As(err, &re) && re.StatusCode == 403 {
			return token{value: value}, nil
		}
		return token{}, u.wrap(ctx, "looking up the Vault token", err)
	}
	t := token{value: value}
	if secret != nil && secret.Data != nil {
		if ttl, err := secondsOf(secret.Data["ttl"]); err == nil && ttl > 0 {
			t.ttl = ttl
			t.expires = u.clock.Now().Add(ttl)
		}
		t.renewable, _ = secret.Data["renewable"].(bool)
	}
	return t, nil
}

// kubernetesLogin logs in with the Kubernetes auth method.
func (u *Upstream) kubernetesLogin(ctx context.Context, k KubernetesAuth) (token, error) {
	jwt, err := os.ReadFile(k.TokenFile)
	if err != nil {
		return token{}, fmt.Errorf("vaultca: reading the service-account token for Vault's Kubernetes login: %w", err)
	}
	u.client.ClearToken()
	secret, err := u.client.Logical().WriteWithContext(ctx, "auth/"+k.Mount+"/login", map[string]any{
		"role": k.Role,
		"jwt":  string(bytes.TrimSpace(jwt)),
	})
	if err != nil {
		return token{}, u.wrap(ctx, fmt.Sprintf("logging in to Vault (auth/%s, role %q)", k.Mount, k.Role), err)
	}
	if secret == nil || secret.Auth == nil || secret.Auth.ClientToken == "" {
		return token{}, fmt.Errorf("vaultca: logging in to Vault (auth/%s, role %q) returned no token", k.Mount, k.Role)
	}
	t := token{value: secret.Auth.ClientToken, renewable: secret.Auth.Renewable}
	if d := time.Duration(secret.Auth.LeaseDuration) * time.Second; d > 0 {
		t.ttl, t.expires = d, u.clock.Now().Add(d)
	}
	u.log.Info("logged in to Vault", "method", "kubernetes", "mount", k.Mount, "role", k.Role, "token_ttl", t.ttl.String())
	return t, nil
}

// ensureToken gets a token when there is none, and renews it (a fixed
// token) or logs in again (a token file, Kubernetes) when little of its
// life is left.
func (u *Upstream) ensureToken(ctx context.Context) error {
	if u.tok.value == "" {
		return u.logIn(ctx)
	}
	if u.tok.ttl == 0 || u.clock.Now().Before(u.tok.expires.Add(-u.tok.ttl/refreshShare)) {
		return nil
	}
	if u.tok.renewable && !u.canLogInAgain() {
		err := u.renew(ctx)
		if err == nil || !errors.Is(err, ca.ErrUpstreamDenied) {
			return err
		}
		u.tok.renewable = false // at its max TTL, or refused: used until it ends
	}
	if u.canLogInAgain() {
		return u.logIn(ctx)
	}
	if !u.clock.Now().Before(u.tok.expires) {
		return fmt.Errorf("vaultca: the Vault token expired at %s and cannot be renewed; configure a new one: %w",
			u.tok.expires.UTC().Format(time.RFC3339), ca.ErrUpstreamDenied)
	}
	return nil // not renewable: used until it ends
}

func (u *Upstream) logIn(ctx context.Context) error {
	t, err := u.login(ctx)
	if err != nil {
		u.tok = token{}
		u.client.ClearToken()
		return err
	}
	u.tok = t
	u.client.SetToken(t.value)
	return nil
}

// renew renews the token for its TTL again.
func (u *Upstream) renew(ctx context.Context) error {
	secret, err := u.client.Auth().Token().RenewSelfWithContext(ctx, int(u.tok.ttl/time.Second))
	if err != nil {
		return u.wrap(ctx, "renewing the Vault token", err)
	}
	if secret != nil && secret.Auth != nil && secret.Auth.LeaseDuration > 0 {
		d := time.Duration(secret.Auth.LeaseDuration) * time.Second
		if d < u.tok.ttl/refreshShare {
			// At its max TTL: renewing again would not help.
			u.tok.renewable = false
		}
		u.tok.ttl, u.tok.expires = d, u.clock.Now().Add(d)
	}
	u.log.Info("renewed the Vault token", "token_ttl", u.tok.ttl.String())
	return nil
}

// do makes one request to Vault with a valid token, logging in again and
// retrying once when Vault refuses a token that a new login may replace.
func (u *Upstream) do(ctx context.Context, op string, req func(context.Context, *vault.Client) (*vault.Secret, error)) (*vault.Secret, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if err := u.ensureToken(ctx); err != nil {
		return nil, err
	}
	secret, err := req(ctx, u.client)
	var re *vault.ResponseError
	if err != nil && errors.As(err, &re) && re.StatusCode == 403 && u.canLogInAgain() {
		u.log.Info("Vault refused the token; logging in again", "op", op)
		if err := u.logIn(ctx); err != nil {
			return nil, err
		}
		secret, err = req(ctx, u.client)
	}
	if err != nil {
		return nil, u.wrap(ctx, op, err)
	}
	return secret, nil
}

// wrap says what failed, wrapping ca.ErrUpstreamUnavailable for an outage
// and ca.ErrUpstreamDenied for a refusal. Vault's own messages are kept;
// the token is never in them (it travels in a header), and is taken out
// should it ever be.
func (u *Upstream) wrap(ctx context.Context, op string, err error) error {
	if ctxErr := ctx.Err(); ctxErr != nil {
		return fmt.Errorf("vaultca: %s: %w", op, ctxErr)
	}
	var re *vault.ResponseError
	if !errors.As(err, &re) {
		return fmt.Errorf("vaultca: %s: Vault at %s cannot be reached: %w: %w", op, u.cfg.Address, ca.ErrUpstreamUnavailable, err)
	}
	msg := u.redact(vaultErrors(re.Errors))
	switch {
	case (re.StatusCode == 401 || re.StatusCode == 403) && strings.Contains(msg, "invalid token"):
		return fmt.Errorf("vaultca: %s: Vault at %s refused the token (HTTP %d: %s): it is unknown, revoked or expired: %w", op, u.cfg.Address, re.StatusCode, msg, ca.ErrUpstreamDenied)
	case re.StatusCode == 401 || re.StatusCode == 403:
		return fmt.Errorf("vaultca: %s: Vault at %s denied it (HTTP %d: %s); the token's policy must allow it: %w", op, u.cfg.Address, re.StatusCode, msg, ca.ErrUpstreamDenied)
	case re.StatusCode == 429 || re.StatusCode >= 500:
		return fmt.Errorf("vaultca: %s: Vault at %s is unavailable (HTTP %d: %s): %w", op, u.cfg.Address, re.StatusCode, msg, ca.ErrUpstreamUnavailable)
	}
	return fmt.Errorf("vaultca: %s: Vault at %s refused it (HTTP %d: %s)", op, u.cfg.Address, re.StatusCode, msg)
}

// vaultErrors joins Vault's error messages, flattening its multi-error
// lists ("1 error occurred:\n\t* permission denied\n\n").
func vaultErrors(errs []string) string {
	var out []string
	for _, e := range errs {
		for _, line := range strings.Split(e, "\n") {
			line = strings.TrimSpace(line)
			if line == "" || strings.HasSuffix(line, "error occurred:") || strings.HasSuffix(line, "errors occurred:") {
				continue
			}
			out = append(out, strings.TrimPrefix(line, "* "))
		}
	}
	if len(out) == 0 {
		return "no message"
	}
	return strings.Join(out, "; ")
}

// redact takes the current token out of s.
func (u *Upstream) redact(s string) string {
	if v := u.tok.value; len(v) >= 8 {
		s = strings.ReplaceAll(s, v, "<redacted>")
	}
	if v := u.cfg.Auth.Token; len(v) >= 8 {
		s = strings.ReplaceAll(s, v, "<redacted>")
	}
	return s
}

// secondsOf reads a count of seconds from a Vault response.
func secondsOf(v any) (time.Duration, error) {
	switch n := v.(type) {
	case json.Number:
		s, err := n.Int64()
		return time.Duration(s) * time.Second, err
	case float64:
		return time.Duration(n) * time.Second, nil
	case int64:
		return time.Duration(n) * time.Second, nil
	case int:
		return time.Duration(n) * time.Second, nil
	}
	return 0, fmt.Errorf("not a number of seconds: %T", v)
}
