//go:build tools

// Package tools pins github.com/hashicorp/vault (the vault command) so that
// go.mod and go.sum hold exactly what scripts/vault.sh builds.
package tools

import _ "github.com/hashicorp/vault"
