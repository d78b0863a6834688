package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	adminv1 "github.com/meshca/meshca/proto/meshca/admin/v1"
)

func newFederationCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "federation",
		Short: "Federate with other trust domains: add, list, show, refresh, remove",
		Long: `SPIFFE federation: this server fetches each peer trust domain's bundle from
the peer's bundle endpoint, at the refresh hint the peer serves, and sends
it to workloads (in every Sign response, on the bundle stream, and in the
ConfigMaps in Kubernetes mode), so that they can authenticate the peer's
workloads. A failed fetch keeps the last good bundle.

A peer's endpoint authenticates itself with one of two profiles:

  https_spiffe  the endpoint presents an X509-SVID of the peer's trust
                domain (meshca's is spiffe://<trust domain>/meshca/server).
                Give its SPIFFE ID (--endpoint-id) and the peer's bundle
                obtained out of band (--bundle-file: on the peer, meshctl
                bundle, or its <data-dir>/bundle.pem); after the first
                fetch the endpoint is verified with the bundle it serves, so
                the peer can rotate its root.
  https_web     the endpoint presents a Web PKI certificate for its host
                name, verified with --web-ca-file or the system's roots.

Peers of the server's config file (federation.peers) are changed there; in
Kubernetes mode all peers are, and add and remove are refused.`,
	}
	cmd.AddCommand(
		newFederationAddCommand(),
		newFederationListCommand(),
		newFederationShowCommand(),
		newFederationRefreshCommand(),
		newFederationRemoveCommand(),
	)
	return cmd
}

type federationAddOptions struct {
	admin      adminFlags
	url        string
	profile    string
	endpointID string
	bundleFile string
	webCAFile  string
}

func newFederationAddCommand() *cobra.Command {
	o := &federationAddOptions{}
	cmd := &cobra.Command{
		Use:   "add <trust-domain>",
		Short: "Start federating with a trust domain",
		Long: `add starts federating with a trust domain: the server fetches its bundle
from --url at once and then at its refresh hint, and publishes it to
workloads. With https_spiffe the bootstrap bundle is published at once,
before the first fetch. The peer's status is printed, as by show.`,
		Example: `  # A meshca peer over https_spiffe, bootstrapped with its bundle.pem:
  meshctl federation add west.example --url https://meshca.west.example:8444/ \
    --profile https_spiffe --endpoint-id spiffe://west.example/meshca/server \
    --bundle-file west-bundle.pem

  # A peer whose endpoint has a Web PKI certificate:
  meshctl federation add east.example --url https://bundle.east.example/ \
    --profile https_web --web-ca-file east-ca.pem`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error { return o.run(cmd, args[0]) },
	}
	o.admin.register(cmd)
	f := cmd.Flags()
	f.StringVar(&o.url, "url", "", "the peer's bundle endpoint, an https URL (required)")
	f.StringVar(&o.profile, "profile", "", "how the endpoint authenticates: https_spiffe or https_web (required)")
	f.StringVar(&o.endpointID, "endpoint-id", "", "https_spiffe: the SPIFFE ID the endpoint presents (meshca's: spiffe://<trust-domain>/meshca/server)")
	f.StringVar(&o.bundleFile, "bundle-file", "", `https_spiffe: the peer's bundle obtained out of band, PEM or SPIFFE JSON ("-" for standard input)`)
	f.StringVar(&o.webCAFile, "web-ca-file", "", "https_web: PEM roots that verify the endpoint (default the system's roots)")
	return cmd
}

func (o *federationAddOptions) request(td string) (*adminv1.FederationAddRequest, error) {
	req := &adminv1.FederationAddRequest{TrustDomain: td, Url: o.url, Profile: o.profile, EndpointSpiffeId: o.endpointID}
	switch {
	case o.url == "":
		return nil, errors.New("--url is required: the peer's bundle endpoint")
	case o.profile == "https_spiffe":
		if o.endpointID == "" {
			return nil, fmt.Errorf("--profile https_spiffe needs --endpoint-id, the SPIFFE ID the endpoint presents (meshca's: spiffe://%s/meshca/server)", td)
		}
		if o.bundleFile == "" {
			return nil, errors.New("--profile https_spiffe needs --bundle-file, the peer's bundle obtained out of band")
		}
		if o.webCAFile != "" {
			return nil, errors.New("--web-ca-file is for --profile https_web")
		}
	case o.profile == "https_web":
		if o.endpointID != "" || o.bundleFile != "" {
			return nil, errors.New("--endpoint-id and --bundle-file are for --profile https_spiffe")
		}
	case o.profile == "":
		return nil, errors.New("--profile is required: https_spiffe or https_web")
	default:
		return nil, fmt.Errorf("--profile %q: want https_spiffe or https_web", o.profile)
	}
	var err error
	if o.bundleFile != "" {
		if req.BootstrapBundle, err = readFileOrStdin(o.bundleFile); err != nil {
			return nil, fmt.Errorf("--bundle-file: %w", err)
		}
	}
	if o.webCAFile != "" {
		if req.WebRoots, err = readFileOrStdin(o.webCAFile); err != nil {
			return nil, fmt.Errorf("--web-ca-file: %w", err)
		}
	}
	return req, nil
}

func (o *federationAddOptions) run(cmd *cobra.Command, td string) error {
	req, err := o.request(td)
	if err != nil {
		return err
	}
	return o.admin.call(cmd, func(ctx context.Context, client adminv1.AdminServiceClient) error {
		peer, err := client.FederationAdd(ctx, req)
		if err != nil {
			return fmt.Errorf("federation add: %w", err)
		}
		return o.admin.printPeer(cmd.OutOrStdout(), peer)
	})
}

func newFederationListCommand() *cobra.Command {
	f := &adminFlags{}
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the federated trust domains and the state of their bundles",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return f.call(cmd, func(ctx context.Context, client adminv1.AdminServiceClient) error {
				resp, err := client.FederationList(ctx, &adminv1.FederationListRequest{})
				if err != nil {
					return fmt.Errorf("federation list: %w", err)
				}
				if f.output == "json" {
					return writeProtoJSON(cmd.OutOrStdout(), resp)
				}
				printPeers(cmd.OutOrStdout(), resp.GetPeers())
				return nil
			})
		},
	}
	f.register(cmd)
	return cmd
}

func newFederationShowCommand() *cobra.Command {
	f := &adminFlags{}
	cmd := &cobra.Command{
		Use:   "show <trust-domain>",
		Short: "Show a federated trust domain: its endpoint, bundle, roots and fetches",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return f.call(cmd, func(ctx context.Context, client adminv1.AdminServiceClient) error {
				peer, err := client.FederationShow(ctx, &adminv1.FederationShowRequest{TrustDomain: args[0]})
				if err != nil {
					return fmt.Errorf("federation show: %w", err)
				}
				return f.printPeer(cmd.OutOrStdout(), peer)
			})
		},
	}
	f.register(cmd)
	return cmd
}

func newFederationRefreshCommand() *cobra.Command {
	f := &adminFlags{}
	cmd := &cobra.Command{
		Use:   "refresh <trust-domain>",
		Short: "Fetch a federated trust domain's bundle now",
		Long: `refresh fetches the peer's bundle now, whatever its schedule, and prints the
peer's status after the fetch. When the fetch fails the last good bundle is
kept, and refresh says why and exits with status 1.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return f.call(cmd, func(ctx context.Context, client adminv1.AdminServiceClient) error {
				peer, err := client.FederationRefresh(ctx, &adminv1.FederationRefreshRequest{TrustDomain: args[0]})
				if err != nil {
					return fmt.Errorf("federation refresh: %w", err)
				}
				if err := f.printPeer(cmd.OutOrStdout(), peer); err != nil {
					return err
				}
				if e := peer.GetLastError(); e != nil {
					return fmt.Errorf("federation refresh: the fetch failed (%s); the last good bundle is kept: %s", e.GetReason(), e.GetMessage())
				}
				return nil
			})
		},
	}
	f.register(cmd)
	return cmd
}

func newFederationRemoveCommand() *cobra.Command {
	f := &adminFlags{}
	cmd := &cobra.Command{
		Use:   "remove <trust-domain>",
		Short: "Stop federating with a trust domain; its bundle is no longer published",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return f.call(cmd, func(ctx context.Context, client adminv1.AdminServiceClient) error {
				resp, err := client.FederationRemove(ctx, &adminv1.FederationRemoveRequest{TrustDomain: args[0]})
				if err != nil {
					return fmt.Errorf("federation remove: %w", err)
				}
				if f.output == "json" {
					return writeProtoJSON(cmd.OutOrStdout(), resp)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "removed %s: its bundle is no longer sent to workloads\n", args[0])
				return nil
			})
		},
	}
	f.register(cmd)
	return cmd
}

// printPeer prints peer as f's output asks.
func (f *adminFlags) printPeer(w io.Writer, peer *adminv1.FederationPeer) error {
	if f.output == "json" {
		return writeProtoJSON(w, peer)
	}
	printPeer(w, peer)
	return nil
}

func printPeers(w io.Writer, peers []*adminv1.FederationPeer) {
	if len(peers) == 0 {
		fmt.Fprintln(w, "no federated trust domains")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TRUST DOMAIN\tPROFILE\tSEQUENCE\tROOTS\tLAST SUCCESS\tNEXT REFRESH\tLAST ERROR")
	for _, p := range peers {
		lastErr := "-"
		if e := p.GetLastError(); e != nil {
			lastErr = e.GetReason()
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\n", p.GetTrustDomain(), p.GetProfile(), sequence(p), len(p.GetRoots()),
			ts(p.GetLastSuccess()), ts(p.GetNextRefresh()), lastErr)
	}
	tw.Flush()
}

func printPeer(w io.Writer, p *adminv1.FederationPeer) {
	row := func(k, v string) { fmt.Fprintf(w, "%-20s%s\n", k, v) }
	row("trust domain", p.GetTrustDomain())
	row("endpoint", p.GetUrl())
	row("profile", p.GetProfile())
	if id := p.GetEndpointSpiffeId(); id != "" {
		row("endpoint SPIFFE ID", id)
	}
	row("from config", yesNo(p.GetFromConfig()))
	bundle := sequence(p)
	switch {
	case len(p.GetRoots()) == 0:
		bundle = "none yet (no fetch has succeeded)"
	case p.GetBootstrap():
		bundle = "the bootstrap bundle (no fetch has succeeded yet)"
	}
	row("bundle sequence", bundle)
	if h := p.GetRefreshHint(); h != nil {
		row("refresh hint", h.AsDuration().String())
	}
	row("last attempt", ts(p.GetLastAttempt()))
	row("last success", ts(p.GetLastSuccess()))
	row("next refresh", nextRefresh(p))
	row("failures in a row", fmt.Sprint(p.GetConsecutiveFailures()))
	if e := p.GetLastError(); e != nil {
		row("last error", e.GetReason()+": "+e.GetMessage())
	} else {
		row("last error", "-")
	}
	printRoots(w, "\nROOT", p.GetRoots())
	printRoots(w, "\nWEB PKI ROOT", p.GetWebRoots())
}

func printRoots(w io.Writer, title string, roots []*adminv1.FederatedRoot) {
	if len(roots) == 0 {
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "%s SERIAL\tSUBJECT\tNOT AFTER\tSHA-256\n", title)
	for _, r := range roots {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", short(r.GetSerial()), r.GetSubject(), ts(r.GetNotAfter()), r.GetSha256())
	}
	tw.Flush()
}

func sequence(p *adminv1.FederationPeer) string {
	if p.Sequence == nil {
		return "-"
	}
	return fmt.Sprint(p.GetSequence())
}

func nextRefresh(p *adminv1.FederationPeer) string {
	if p.GetNextRefresh() == nil {
		return "at once"
	}
	d := time.Until(p.GetNextRefresh().AsTime()).Round(time.Second)
	if d <= 0 {
		return ts(p.GetNextRefresh()) + " (due)"
	}
	return ts(p.GetNextRefresh()) + " (in " + d.String() + ")"
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// readFileOrStdin reads path, or standard input for "-".
func readFileOrStdin(path string) ([]byte, error) {
	if path == "-" {
		return io.ReadAll(os.Stdin)
	}
	return os.ReadFile(path)
}
