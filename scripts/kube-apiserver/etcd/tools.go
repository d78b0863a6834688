//go:build tools

// Package tools pins go.etcd.io/etcd/server/v3 (the etcd command) so that
// go.mod and go.sum hold exactly what scripts/kube.sh builds.
package tools

import _ "go.etcd.io/etcd/server/v3"
