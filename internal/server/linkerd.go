package server

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	linkerdpb "github.com/meshca/meshca/proto/linkerd/identity"
)

// APILinkerd labels Linkerd's identity API in metrics and audit lines.
const APILinkerd = "linkerd"

// The defaults of LinkerdOptions: Linkerd's own.
const (
	LinkerdAudience                     = "identity.l5d.io"
	DefaultLinkerdControlPlaneNamespace = "linkerd"
	DefaultClusterDomain                = "cluster.local"
)

// maxDNSName is the longest DNS name, without a trailing dot.
const maxDNSName = 253

// LinkerdOptions configure Linkerd's identity API,
// io.linkerd.proxy.identity.Identity/Certify.
//
// A Linkerd proxy asks for the identity
// <sa>.<ns>.serviceaccount.identity.<ControlPlaneNamespace>.<ClusterDomain>
// with its service-account token in the request's body. The identity
// stands for the SPIFFE ID spiffe://<trust-domain>/ns/<ns>/sa/<sa>, which
// the server's identity.Policy authorises as it does on every API, so
// only a Kubernetes service-account token (reviewed for Audiences) is
// accepted: static bootstrap tokens and client certificates are not. The
// leaf's only SAN is the identity, as a DNS name; it chains to the CA's
// roots, which are Linkerd's trust anchors.
type LinkerdOptions struct {
	// Enabled registers the service on the gRPC server.
	Enabled bool

	// Audiences a service-account token must be valid for, one of them,
	// on this API. Empty means [LinkerdAudience].
	Audiences []string

	// ControlPlaneNamespace is the namespace of Linkerd's control plane,
	// part of every identity name. Empty means
	// DefaultLinkerdControlPlaneNamespace.
	ControlPlaneNamespace string

	// ClusterDomain is the cluster's DNS domain, the end of every
	// identity name (Linkerd's identity trust domain). Empty means
	// DefaultClusterDomain.
	ClusterDomain string
}

func (o LinkerdOptions) complete() (LinkerdOptions, error) {
	if len(o.Audiences) == 0 {
		o.Audiences = []string{LinkerdAudience}
	}
	if slices.Contains(o.Audiences, "") {
		return o, errors.New("server: Linkerd.Audiences has an empty audience")
	}
	o.Audiences = slices.Clone(o.Audiences)
	if o.ControlPlaneNamespace == "" {
		o.ControlPlaneNamespace = DefaultLinkerdControlPlaneNamespace
	}
	if o.ClusterDomain == "" {
		o.ClusterDomain = DefaultClusterDomain
	}
	if errs := validation.IsDNS1123Label(o.ControlPlaneNamespace); len(errs) > 0 {
		return o, fmt.Errorf("server: Linkerd.ControlPlaneNamespace %q is not a namespace name: %s", o.ControlPlaneNamespace, strings.Join(errs, "; "))
	}
	if errs := validation.IsDNS1123Subdomain(o.ClusterDomain); len(errs) > 0 {
		return o, fmt.Errorf("server: Linkerd.ClusterDomain %q is not a DNS domain: %s", o.ClusterDomain, strings.Join(errs, "; "))
	}
	return o, nil
}

// suffix is what follows <sa>.<ns> in every identity name.
func (o LinkerdOptions) suffix() string {
	return ".serviceaccount.identity." + o.ControlPlaneNamespace + "." + o.ClusterDomain
}

type linkerdService struct {
	linkerdpb.UnimplementedIdentityServer
	s *Server
}

// Certify issues a certificate for the identity of the request. The
// certificates are DER, as Linkerd's proxy and identity service use.
func (l *linkerdService) Certify(ctx context.Context, req *linkerdpb.CertifyRequest) (*linkerdpb.CertifyResponse, error) {
	token := req.GetToken()
	issued, err := l.s.issue(ctx, issueRequest{
		api:  APILinkerd,
		csr:  req.GetCertificateSigningRequest(),
		form: linkerdForm{identity: req.GetIdentity(), suffix: l.s.linkerd.suffix()},
		credential: func(context.Context) (identity.Credential, error) {
			t, err := identity.ParseToken(token, "the request's token")
			return identity.Credential{Token: t}, err
		},
		audiences: l.s.linkerd.Audiences,
		// The identity name is derived from a service account: only a
		// token of one proves it.
		methods: []identity.Method{identity.MethodKubernetesToken},
	})
	if err != nil {
		return nil, err
	}
	intermediates := make([][]byte, 0, len(issued.Chain)-1)
	for _, cert := range issued.Chain[1:] {
		intermediates = append(intermediates, cert.Raw)
	}
	return &linkerdpb.CertifyResponse{
		LeafCertificate:          issued.Cert.Raw,
		IntermediateCertificates: intermediates,
		ValidUntil:               timestamppb.New(issued.Cert.NotAfter),
	}, nil
}

// linkerdForm is the request of Linkerd's API: the identity name in the
// request, and the same name as the CSR's only DNS SAN. The leaf carries
// the name alone; the policy authorises the SPIFFE ID it stands for.
type linkerdForm struct {
	identity string
	suffix   string
}

func (f linkerdForm) read(raw []byte, td spiffeid.TrustDomain) (ca.SignRequest, error) {
	id, err := f.workloadID(td)
	if err != nil {
		return ca.SignRequest{}, err
	}
	csr, err := ca.ParseDNSCSR(raw, ca.CSRPolicy{})
	if err != nil {
		return ca.SignRequest{}, err
	}
	if csr.DNSName != f.identity {
		return ca.SignRequest{}, refusef(codes.InvalidArgument, "csr_identity_mismatch",
			"the CSR's DNS SAN %q is not the request's identity %q; put the identity in both", csr.DNSName, f.identity)
	}
	return ca.SignRequest{PublicKey: csr.PublicKey, ID: id, DNSNames: []string{f.identity}, DNSOnly: true}, nil
}

// workloadID returns the SPIFFE ID of the identity name:
// <sa>.<ns><suffix> is spiffe://<td>/ns/<ns>/sa/<sa>. A namespace has no
// dot, so a service account name with dots is still read one way only.
func (f linkerdForm) workloadID(td spiffeid.TrustDomain) (spiffeid.ID, error) {
	name := f.identity
	if len(name) > maxDNSName {
		return spiffeid.ID{}, refusef(codes.InvalidArgument, "bad_identity",
			"the request's identity is %d bytes, longer than a DNS name (%d)", len(name), maxDNSName)
	}
	prefix, ok := strings.CutSuffix(name, f.suffix)
	if !ok {
		return spiffeid.ID{}, refusef(codes.InvalidArgument, "wrong_identity_suffix",
			"identity %q does not end in %q: ask for <service-account>.<namespace>%s (the proxy's control plane namespace and cluster domain must be those of meshca's linkerd configuration)", name, f.suffix, f.suffix)
	}
	i := strings.LastIndexByte(prefix, '.')
	if i < 0 {
		return spiffeid.ID{}, refusef(codes.InvalidArgument, "bad_identity",
			"identity %q is not <service-account>.<namespace>%s", name, f.suffix)
	}
	sa, ns := prefix[:i], prefix[i+1:]
	if len(validation.IsDNS1123Label(ns)) > 0 || len(validation.IsDNS1123Subdomain(sa)) > 0 {
		return spiffeid.ID{}, refusef(codes.InvalidArgument, "bad_identity",
			"identity %q is not <service-account>.<namespace>%s with a valid service account and namespace name", name, f.suffix)
	}
	id, err := identity.WorkloadID(td, ns, sa)
	if err != nil {
		return spiffeid.ID{}, refusef(codes.InvalidArgument, "bad_identity", "identity %q has no SPIFFE ID: %v", name, err)
	}
	return id, nil
}
