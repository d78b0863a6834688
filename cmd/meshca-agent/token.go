package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/internal/securefile"
)

// serviceAccountFromToken returns the namespace and service account a
// Kubernetes service-account token names, from its claims: the
// "kubernetes.io" claim of bound (projected) tokens, or the
// "kubernetes.io/serviceaccount/..." claims of legacy ones.
//
// The token is not verified: meshca-server has the API server review it,
// and refuses an ID the token does not prove. Reading the claims only
// spares configuring the ID twice.
func serviceAccountFromToken(token string) (namespace, serviceAccount string, err error) {
	if len(token) > identity.MaxTokenLength {
		return "", "", errors.New("the token is too long to be a service-account token")
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return "", "", errors.New("the token is not a JWT")
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return "", "", errors.New("the token's payload is not base64url")
	}
	var claims struct {
		Kubernetes *struct {
			Namespace      string `json:"namespace"`
			ServiceAccount struct {
				Name string `json:"name"`
			} `json:"serviceaccount"`
		} `json:"kubernetes.io"`
		LegacyNamespace      string `json:"kubernetes.io/serviceaccount/namespace"`
		LegacyServiceAccount string `json:"kubernetes.io/serviceaccount/service-account.name"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil {
		return "", "", errors.New("the token's payload is not a JSON object")
	}
	switch {
	case claims.Kubernetes != nil:
		namespace, serviceAccount = claims.Kubernetes.Namespace, claims.Kubernetes.ServiceAccount.Name
	default:
		namespace, serviceAccount = claims.LegacyNamespace, claims.LegacyServiceAccount
	}
	if namespace == "" || serviceAccount == "" {
		return "", "", errors.New("the token names no Kubernetes namespace and service account")
	}
	return namespace, serviceAccount, nil
}

// tokenReader returns the agent's credential: the token file re-read at
// every use (the kubelet rotates projected tokens), or the bootstrap token
// file, which must be private. Errors name the file, never its content.
func tokenReader(cfg *completeConfig) func(context.Context) (string, error) {
	if cfg.BootstrapTokenFile != "" {
		path := cfg.BootstrapTokenFile
		return func(context.Context) (string, error) {
			data, err := securefile.ReadPrivate(path)
			if err != nil {
				return "", fmt.Errorf("bootstrap token: %w", err)
			}
			return nonEmpty(path, data)
		}
	}
	path := cfg.TokenFile
	return func(context.Context) (string, error) {
		data, err := os.ReadFile(path)
		if err != nil {
			return "", fmt.Errorf("token: %w", err)
		}
		return nonEmpty(path, data)
	}
}

func nonEmpty(path string, data []byte) (string, error) {
	token := strings.TrimSpace(string(data))
	if token == "" {
		return "", fmt.Errorf("token file %s is empty", path)
	}
	return token, nil
}
