//go:build tools

// Package tools pins k8s.io/kubernetes/cmd/kube-apiserver so that go.mod and
// go.sum hold exactly what scripts/kube.sh builds.
package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
