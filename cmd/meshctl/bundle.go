package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/meshca/meshca/internal/pemutil"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
)

type bundleOptions struct {
	server serverFlags
	format string
	watch  bool
	output string
}

func newBundleCommand() *cobra.Command {
	o := &bundleOptions{}
	cmd := &cobra.Command{
		Use:   "bundle",
		Short: "Print the server's trust bundle, or watch it change",
		Long: `bundle fetches the trust bundle of the server's trust domain (the roots a
workload must trust) and prints it:

  --format pem     the X.509 roots as PEM, ready to save as a bundle file
                   (the default)
  --format spiffe  the bundle as the server's SPIFFE trust bundle (a JWK Set
                   with spiffe_sequence and spiffe_refresh_hint), as served on
                   the federation endpoint, printed as received

-o json prints a summary instead: {"trustDomain", "sequence", "refreshHint"
(seconds), "roots": [{"subject", "serial" (hex), "notAfter"}]}.

--watch keeps a stream open and prints the bundle at once and then each time
it or a federated trust domain's bundle changes (a root prepared, activated
or retired; a peer added, removed or rotating its root), each preceded by a
"# sequence N" line that also names the federated bundles (with -o json:
one JSON object a line, with "federated": the federated bundles'
summaries), until interrupted. Only the server's own bundle is printed as
PEM or SPIFFE JSON. A broken stream is reopened; an update already printed
is not printed again.

The bundle needs no credential; the server is still verified with
--ca-bundle (or not at all with --insecure, for a first contact).`,
		Example: `  meshctl bundle --ca-bundle .meshca/bundle.pem > bundle.pem
  meshctl bundle --insecure --server ca.example:8443 --format spiffe
  meshctl bundle --ca-bundle .meshca/bundle.pem -o json
  meshctl bundle --ca-bundle .meshca/bundle.pem --watch`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return o.run(cmd) },
	}
	o.server.register(cmd)
	f := cmd.Flags()
	f.StringVar(&o.format, "format", "pem", "text format: pem (the X.509 roots) or spiffe (the SPIFFE bundle JSON)")
	f.BoolVar(&o.watch, "watch", false, "print the bundle again each time it changes, until interrupted")
	f.StringVarP(&o.output, "output", "o", "text", "output format: text (see --format) or json (a summary)")
	return cmd
}

func (o *bundleOptions) validate(cmd *cobra.Command) error {
	if o.output != "text" && o.output != "json" {
		return fmt.Errorf("--output %q: want text or json", o.output)
	}
	if o.format != "pem" && o.format != "spiffe" {
		return fmt.Errorf("--format %q: want pem or spiffe", o.format)
	}
	if o.output == "json" && cmd.Flags().Changed("format") {
		return errors.New("--format is for text output; -o json prints a summary of the bundle")
	}
	return nil
}

func (o *bundleOptions) run(cmd *cobra.Command) error {
	if err := o.validate(cmd); err != nil {
		return err
	}
	conn, err := o.server.dial(nil)
	if err != nil {
		return err
	}
	defer conn.Close()
	client := meshcav1.NewBundleServiceClient(conn)
	w := cmd.OutOrStdout()
	if !o.watch {
		ctx, cancel := o.server.context(cmd.Context())
		defer cancel()
		pb, err := client.GetBundle(ctx, &meshcav1.GetBundleRequest{})
		if err != nil {
			return fmt.Errorf("getting the bundle: %w", err)
		}
		return writeBundle(w, pb, o.format, o.output, false)
	}
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return watchBundle(ctx, client, cmd.ErrOrStderr(), time.Second, func(up *meshcav1.BundleUpdate) error {
		return writeBundles(w, up.GetBundle(), up.GetFederatedBundles(), o.format, o.output, true)
	})
}

// watchBundle calls show with each new update the server sends (a new
// bundle, or new federated bundles), until ctx is done. A stream that
// breaks after it has delivered an update is reopened after firstBackoff,
// doubling up to 30s while it keeps failing; one that fails before is an
// error.
func watchBundle(ctx context.Context, client meshcav1.BundleServiceClient, stderr io.Writer, firstBackoff time.Duration, show func(*meshcav1.BundleUpdate) error) error {
	var (
		received bool
		retried  bool
		last     *meshcav1.BundleUpdate
		backoff  = firstBackoff
	)
	for {
		err := func() error {
			stream, err := client.WatchBundle(ctx, &meshcav1.WatchBundleRequest{})
			if err != nil {
				return err
			}
			for {
				up, err := stream.Recv()
				if err != nil {
					return err
				}
				if retried {
					fmt.Fprintf(stderr, "meshctl: watching the bundle again (sequence %d)\n", up.GetBundle().GetSequence())
					backoff, retried = firstBackoff, false
				}
				if received && sameUpdate(last, up) {
					continue
				}
				if err := show(up); err != nil {
					return err
				}
				received, last = true, up
			}
		}()
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, io.EOF) {
			err = errStreamEnded
		}
		if !received || !retryableWatchError(err) {
			return fmt.Errorf("watching the bundle: %w", err)
		}
		fmt.Fprintf(stderr, "meshctl: watching the bundle: %v; retrying in %s\n", err, backoff)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		retried, backoff = true, min(2*backoff, 30*time.Second)
	}
}

var errStreamEnded = errors.New("the server ended the stream")

// sameUpdate reports whether b holds what a held: the same bundle
// sequence and the same federated bundles.
func sameUpdate(a, b *meshcav1.BundleUpdate) bool {
	return a.GetBundle().GetSequence() == b.GetBundle().GetSequence() &&
		slices.EqualFunc(a.GetFederatedBundles(), b.GetFederatedBundles(), func(x, y *meshcav1.TrustBundle) bool { return proto.Equal(x, y) })
}

// retryableWatchError says whether a broken watch is worth reopening: the
// server went away or restarted, not a refusal that would repeat.
func retryableWatchError(err error) bool {
	if errors.Is(err, errStreamEnded) {
		return true
	}
	if _, ok := status.FromError(err); !ok {
		return false
	}
	switch status.Code(err) {
	case codes.Unavailable, codes.Internal, codes.Unknown, codes.DeadlineExceeded, codes.Aborted:
		return true
	}
	return false
}

// bundleInfo is the summary -o json prints.
type bundleInfo struct {
	TrustDomain string `json:"trustDomain"`
	Sequence    uint64 `json:"sequence"`
	// RefreshHint is in seconds, as in a SPIFFE bundle.
	RefreshHint int64      `json:"refreshHint"`
	Roots       []rootInfo `json:"roots"`

	// Federated are the federated trust domains' bundles, in a watch.
	Federated []bundleInfo `json:"federated,omitempty"`
}

type rootInfo struct {
	Subject  string    `json:"subject"`
	Serial   string    `json:"serial"`
	NotAfter time.Time `json:"notAfter"`
}

// summarizeBundle checks that pb's roots parse and summarizes it.
func summarizeBundle(pb *meshcav1.TrustBundle) (bundleInfo, error) {
	certs, err := pemutil.ParseDER(pb.GetX509Authorities())
	if err != nil {
		return bundleInfo{}, fmt.Errorf("the server's bundle: %w", err)
	}
	info := bundleInfo{
		TrustDomain: pb.GetTrustDomain(),
		Sequence:    pb.GetSequence(),
		RefreshHint: int64(pb.GetRefreshHint().AsDuration() / time.Second),
		Roots:       make([]rootInfo, len(certs)),
	}
	for i, c := range certs {
		info.Roots[i] = rootInfo{Subject: c.Subject.String(), Serial: c.SerialNumber.Text(16), NotAfter: c.NotAfter.UTC()}
	}
	return info, nil
}

// writeBundle prints pb as format (pem or spiffe) or, when output is
// json, its summary. In a watch every bundle is one JSON line, or is
// preceded by a "# sequence" line.
func writeBundle(w io.Writer, pb *meshcav1.TrustBundle, format, output string, watch bool) error {
	return writeBundles(w, pb, nil, format, output, watch)
}

// writeBundles is writeBundle with the federated bundles of a watch
// update, summarised in the JSON object or the "# sequence" line.
func writeBundles(w io.Writer, pb *meshcav1.TrustBundle, federated []*meshcav1.TrustBundle, format, output string, watch bool) error {
	info, err := summarizeBundle(pb)
	if err != nil {
		return err
	}
	for _, f := range federated {
		fi, err := summarizeBundle(f)
		if err != nil {
			return fmt.Errorf("federated bundle of %q: %w", f.GetTrustDomain(), err)
		}
		info.Federated = append(info.Federated, fi)
	}
	if output == "json" {
		enc := json.NewEncoder(w)
		if !watch {
			enc.SetIndent("", "  ")
		}
		return enc.Encode(info)
	}
	var body []byte
	switch format {
	case "spiffe":
		body = pb.GetSpiffeJson()
		if len(body) == 0 {
			return errors.New("the server sent no SPIFFE bundle (spiffe_json is empty)")
		}
		if body[len(body)-1] != '\n' {
			body = append(body[:len(body):len(body)], '\n')
		}
	default:
		certs, _ := pemutil.ParseDER(pb.GetX509Authorities())
		body = pemutil.EncodeCertificates(certs...)
	}
	if watch {
		var fed strings.Builder
		for i, f := range info.Federated {
			if i == 0 {
				fed.WriteString("federated: ")
			} else {
				fed.WriteString("; ")
			}
			fmt.Fprintf(&fed, "%s (sequence %d, %d root(s))", f.TrustDomain, f.Sequence, len(f.Roots))
		}
		if fed.Len() > 0 {
			fed.WriteString(", ")
		}
		if _, err := fmt.Fprintf(w, "# sequence %d, trust domain %s, %d root(s), %sreceived %s\n",
			info.Sequence, info.TrustDomain, len(info.Roots), fed.String(), time.Now().UTC().Format(time.RFC3339)); err != nil {
			return err
		}
	}
	_, err = w.Write(body)
	return err
}
