package server

import (
	"context"
	"errors"
	"math"
	"slices"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/structpb"
	securityv1alpha1 "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/pemutil"
)

// APIIstio labels Istio's CA API in metrics and audit lines.
const APIIstio = "istio"

// IstioAudience is the default audience of the service-account tokens
// Istio's proxies present (Istio's own default, "istio-ca").
const IstioAudience = "istio-ca"

// impersonatedIdentity is the key of the request metadata with which
// ztunnel asks for a certificate of another identity than its own.
const impersonatedIdentity = "ImpersonatedIdentity"

// IstioOptions configure Istio's CA API,
// istio.v1.auth.IstioCertificateService/CreateCertificate. The caller
// authenticates as on the native API, with "authorization: Bearer
// <token>" metadata or its current certificate over mTLS, and its CSR is
// an X509-SVID request in PEM.
type IstioOptions struct {
	// Enabled registers the service on the gRPC server.
	Enabled bool

	// Audiences a service-account token must be valid for, one of them,
	// on this API. Empty means [IstioAudience]. Static bootstrap tokens
	// are bound to no audience, and are accepted here as on the native
	// API.
	Audiences []string
}

func (o IstioOptions) complete() (IstioOptions, error) {
	if len(o.Audiences) == 0 {
		o.Audiences = []string{IstioAudience}
	}
	if slices.Contains(o.Audiences, "") {
		return o, errors.New("server: Istio.Audiences has an empty audience")
	}
	o.Audiences = slices.Clone(o.Audiences)
	return o, nil
}

type istioService struct {
	securityv1alpha1.UnimplementedIstioCertificateServiceServer
	s *Server
}

// CreateCertificate issues a certificate for the CSR. The response's chain
// is PEM, one certificate an element, leaf first; its last element is the
// trust bundle (every root, in PEM), as Istio's own CA answers.
func (i *istioService) CreateCertificate(ctx context.Context, req *securityv1alpha1.IstioCertificateRequest) (*securityv1alpha1.IstioCertificateResponse, error) {
	r := issueRequest{
		api:       APIIstio,
		csr:       []byte(req.GetCsr()),
		form:      svidForm{policy: ca.CSRPolicy{RequirePEM: true}},
		ttl:       istioTTL(req.GetValidityDuration()),
		audiences: i.s.istio.Audiences,
	}
	if impersonates(req.GetMetadata()) {
		r.refused = refusef(codes.PermissionDenied, "impersonation",
			"the request's metadata asks for a certificate of another identity (%s); meshca does not support impersonation and issues only the caller's own identity", impersonatedIdentity)
	}
	issued, err := i.s.issue(ctx, r)
	if err != nil {
		return nil, err
	}
	chain := make([]string, 0, len(issued.Chain)+1)
	for _, cert := range issued.Chain {
		chain = append(chain, string(pemutil.EncodeCertificates(cert)))
	}
	chain = append(chain, i.s.bundlePEM())
	return &securityv1alpha1.IstioCertificateResponse{CertChain: chain}, nil
}

// impersonates reports whether a request's metadata asks for another
// identity than the caller's: any value of ImpersonatedIdentity but the
// empty string, which Istio's own CA takes as none.
func impersonates(md *structpb.Struct) bool {
	v, ok := md.GetFields()[impersonatedIdentity]
	if !ok {
		return false
	}
	_, isString := v.GetKind().(*structpb.Value_StringValue)
	return !isString || v.GetStringValue() != ""
}

// istioTTL turns validity_duration, in seconds, into the TTL asked for:
// zero or less asks for the CA's default, and the TTL policy clamps what
// is too long (a value past what a time.Duration holds included).
func istioTTL(seconds int64) time.Duration {
	switch {
	case seconds <= 0:
		return 0
	case seconds > int64(math.MaxInt64/time.Second):
		return math.MaxInt64
	}
	return time.Duration(seconds) * time.Second
}
