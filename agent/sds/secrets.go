package sds

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshca/meshca/internal/pemutil"
)

// SPIFFEValidatorName is the name of Envoy's SPIFFE certificate validator
// extension, which the federated validation context configures.
const SPIFFEValidatorName = "envoy.tls.cert_validator.spiffe"

// build returns the secrets of svid, the bundle of its trust domain and the
// federated bundles: the tls_certificate, the own validation context and
// the federated one, in that order.
func (s *Server) build(ctx context.Context, svid *x509svid.SVID, bundle *x509bundle.Bundle, federated []*x509bundle.Bundle) ([]types.Resource, error) {
	cert, err := tlsCertificate(s.names.cert, svid)
	if err != nil {
		return nil, err
	}
	td := svid.ID.TrustDomain()
	if bundle == nil || len(bundle.X509Authorities()) == 0 {
		return nil, fmt.Errorf("sds: the bundle of %q has no X.509 authorities", td)
	}
	roots := validationContext(s.names.roots, &tlsv3.CertificateValidationContext{
		TrustedCa: inline(pemutil.EncodeCertificates(bundle.X509Authorities()...)),
	})

	// One entry per trust domain, each with only its own roots, sorted by
	// name so that equal state builds an equal secret.
	domains := []*tlsv3.SPIFFECertValidatorConfig_TrustDomain{spiffeTrustDomain(bundle)}
	for _, b := range federated {
		switch {
		case b.TrustDomain() == td:
			s.log.LogAttrs(ctx, slog.LevelWarn, "ignoring a federated bundle of the SVID's own trust domain", slog.String("trust_domain", td.Name()))
		case len(b.X509Authorities()) == 0:
			// Envoy would reject the whole validation context.
			s.log.LogAttrs(ctx, slog.LevelWarn, "ignoring a federated bundle with no X.509 authorities", slog.String("trust_domain", b.TrustDomain().Name()))
		default:
			domains = append(domains, spiffeTrustDomain(b))
		}
	}
	slices.SortFunc(domains, func(a, b *tlsv3.SPIFFECertValidatorConfig_TrustDomain) int {
		return strings.Compare(a.GetName(), b.GetName())
	})
	validator, err := anypb.New(&tlsv3.SPIFFECertValidatorConfig{TrustDomains: domains})
	if err != nil {
		return nil, fmt.Errorf("sds: encoding the SPIFFE validator config: %w", err)
	}
	all := validationContext(s.names.federated, &tlsv3.CertificateValidationContext{
		CustomValidatorConfig: &corev3.TypedExtensionConfig{Name: SPIFFEValidatorName, TypedConfig: validator},
	})

	secrets := []types.Resource{cert, roots, all}
	for _, secret := range secrets {
		if err := secret.(*tlsv3.Secret).ValidateAll(); err != nil {
			// The validation errors name fields, never their values.
			return nil, fmt.Errorf("sds: secret %q is not valid: %w", secret.(*tlsv3.Secret).GetName(), err)
		}
	}
	return secrets, nil
}

// tlsCertificate returns the tls_certificate secret of svid: its chain,
// leaf first, and its private key as PKCS#8, both inline PEM.
func tlsCertificate(name string, svid *x509svid.SVID) (*tlsv3.Secret, error) {
	if len(svid.Certificates) == 0 || svid.PrivateKey == nil {
		return nil, errors.New("sds: the X509-SVID has no certificates or no private key")
	}
	der, err := x509.MarshalPKCS8PrivateKey(svid.PrivateKey)
	if err != nil {
		// The error names the key's type, never the key.
		return nil, fmt.Errorf("sds: encoding the X509-SVID's private key: %w", err)
	}
	key := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	clear(der)
	return &tlsv3.Secret{
		Name: name,
		Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: inline(pemutil.EncodeCertificates(svid.Certificates...)),
			PrivateKey:       inline(key),
		}},
	}, nil
}

func validationContext(name string, vc *tlsv3.CertificateValidationContext) *tlsv3.Secret {
	return &tlsv3.Secret{
		Name: name,
		Type: &tlsv3.Secret_ValidationContext{ValidationContext: vc},
	}
}

func spiffeTrustDomain(b *x509bundle.Bundle) *tlsv3.SPIFFECertValidatorConfig_TrustDomain {
	return &tlsv3.SPIFFECertValidatorConfig_TrustDomain{
		Name:        b.TrustDomain().Name(),
		TrustBundle: inline(pemutil.EncodeCertificates(b.X509Authorities()...)),
	}
}

func inline(data []byte) *corev3.DataSource {
	return &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: data}}
}

// trustDomainNames returns the names of the bundles' trust domains, for
// logs.
func trustDomainNames(bundles []*x509bundle.Bundle) []string {
	out := make([]string, len(bundles))
	for i, b := range bundles {
		out[i] = b.TrustDomain().Name()
	}
	return out
}
