package files

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshca/meshca/internal/securefile"
)

// Load reads back the X509-SVID in the writer's directory: the one an
// earlier run wrote, for rotation.Options.InitialSVID. It reads the
// generation ..data names, so that the certificate and key belong
// together, or the plain files where there is no ..data. The key file
// must be private (no access for group or others). An error wraps
// fs.ErrNotExist when there are no files. Load does not check that the
// SVID is valid now: its user does.
func (w *Writer) Load() (*x509svid.SVID, error) {
	base := w.dir
	if gen, err := os.Readlink(filepath.Join(w.dir, DataLink)); err == nil {
		base = filepath.Join(w.dir, gen)
	}
	certPEM, err := os.ReadFile(filepath.Join(base, w.certName))
	if err != nil {
		return nil, fmt.Errorf("files: %w", err)
	}
	keyPEM, err := securefile.ReadPrivate(filepath.Join(base, w.keyName))
	if err != nil {
		return nil, fmt.Errorf("files: %w", err)
	}
	svid, err := x509svid.Parse(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("files: the X509-SVID in %s: %w", base, err)
	}
	return svid, nil
}
