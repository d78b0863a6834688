// Package ca is meshca's signer: it validates certificate signing requests,
// issues SPIFFE X509-SVIDs under the X509-SVID profile, applies the TTL
// policy, and holds the authority set (the roots of the trust bundle and the
// intermediate that signs).
//
// A CA is made from an AuthoritySet, usually loaded from (or created in) a
// Store:
//
//	set, err := ca.LoadOrCreate(ctx, store, ca.AuthorityOptions{TrustDomain: td})
//	if err != nil { ... }
//	c, err := ca.New(set, ca.Options{})
//	if err != nil { ... }
//	csr, err := ca.ParseCSR(der, td, ca.CSRPolicy{})
//	if err != nil { ... } // a *CSRError: the caller's mistake
//	issued, err := c.Sign(ctx, ca.SignRequest{
//		PublicKey: csr.PublicKey,
//		ID:        csr.ID,
//		TTL:       time.Hour,
//	})
//
// Issuing is stateless: nothing is stored per certificate.
package ca
