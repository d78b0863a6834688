// Package batch renews the X509-SVIDs of many identities in few calls,
// for an agent or a node that holds the identities of many workloads. It
// is the client of meshca.v1.CertificateService/SignBatch.
//
// Each Entry names an identity and its credential: its current SVID, which
// proves it as an mTLS renewal would (identity.SignSVIDProof) but with no
// TLS handshake per identity, or a bearer token for a first certificate.
// Renew makes a new key and CSR for each entry, packs the entries into as
// few calls as the server's limits allow (MaxEntries entries, and
// MaxRequestBytes bytes, a call), and checks every certificate it gets
// back: the chain parses, is for the entry's ID and new key, and verifies
// against the response's trust bundle.
//
//	results, err := batch.Renew(ctx, meshcav1.NewCertificateServiceClient(conn), []batch.Entry{
//		{ID: webID, Current: webSVID},   // renewal: proven by the current SVID
//		{ID: dbID, Token: dbToken},       // first certificate: a token
//	})
//	if err != nil { ... } // bad entries; nothing was sent
//	for i, r := range results {
//		if r.Err != nil {
//			wait, _ := batch.RetryAfter(r.Err) // the server's hint, if any
//			...
//			continue
//		}
//		serve(entries[i].ID, r.SVID, r.Bundle)
//	}
//
// The connection needs no client certificate and no token of its own:
// the server takes each entry's credential from the entry alone.
package batch
