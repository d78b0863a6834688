// Package files keeps a workload's X509-SVID and trust bundle in PEM
// files, for programs that read certificates only from files, and runs a
// command after every change so that they reload.
//
// Three files are written into a directory: the certificate chain (leaf
// first, then the intermediates), the private key (PKCS#8, "PRIVATE KEY",
// mode 0600) and the roots of the SVID's trust domain. They change
// together, by the layout Kubernetes uses for Secret and ConfigMap volumes
// (its AtomicWriter):
//
//	dir/
//	  ..2026_01_02_15_04_05.123456789/   a generation: the three files
//	    cert.pem  key.pem  bundle.pem
//	  ..data -> ..2026_01_02_15_04_05.123456789
//	  cert.pem   -> ..data/cert.pem
//	  key.pem    -> ..data/key.pem
//	  bundle.pem -> ..data/bundle.pem
//
// A new generation is written and synced in full in a new directory; then
// one rename swaps the ..data symlink to it. So a reader never sees a
// partly written file, and whoever resolves ..data once (reads the link,
// or opens the directory) reads a certificate, key and bundle that belong
// together. Opening cert.pem and key.pem one after the other through the
// top-level links resolves ..data twice and can straddle a swap; such a
// reader should check that the key matches (tls.LoadX509KeyPair does) and
// read again, or read through ..data. The generation before the current
// one is kept until the next swap, so a reader that resolved ..data just
// before a swap still finds its files; older ones are removed.
//
// The simpler alternative, writing each file by rename in turn, makes
// each file whole but lets a reader pair a new certificate with an old
// key; the symlink swap is one atomic step for all three.
//
// Nothing is written when nothing changed, so a restart that finds its
// own files, or a notification that changed only what the files do not
// hold (federated bundles), costs no reload. After each write the
// optional command runs, with a timeout, in the directory, with
// MESHCA_CERT_FILE, MESHCA_KEY_FILE and MESHCA_BUNDLE_FILE in its
// environment. Its failure is logged, with the end of its output, and
// counted; it never stops the writer. A write that fails (a full disk) is
// retried.
//
// Load reads the files back, so an agent restarted during a CA outage can
// serve the SVID it wrote before (rotation.Options.InitialSVID).
//
// Example:
//
//	w, err := files.New(files.Options{
//		Dir:         "/var/run/meshca/certs",
//		TrustDomain: td,
//		Command:     []string{"nginx", "-s", "reload"},
//		Logger:      log,
//	})
//	if err != nil {
//		return err
//	}
//	go w.Run(ctx, src) // src: a rotation.Source
package files
