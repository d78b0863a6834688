package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/user"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	adminv1 "github.com/meshca/meshca/proto/meshca/admin/v1"
)

func newBanCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ban",
		Short: "Emergency bans: stop issuing for an identity or a namespace (add, remove, list)",
		Long: `A ban stops the CA issuing certificates for a SPIFFE ID, or for every ID of
a Kubernetes namespace, through every front end (native, Istio, Linkerd),
for new requests and for renewals over mTLS alike. It takes effect on the
replica that takes it before the command returns, and on every other
replica within seconds (Kubernetes mode: the bans live in a Secret every
replica watches). Bans survive restarts. Every step is audited.

A ban does not revoke certificates already issued: they stay valid until
they expire (at most the maximum leaf lifetime), so a banned workload
loses its identity at its next renewal.

A target is either:

  spiffe://<trust-domain>/ns/shop/sa/web   exactly this SPIFFE ID
  shop                                     every ID under
                                           spiffe://<trust-domain>/ns/shop/
                                           (not ns/shop2)

Any replica takes or lifts a ban; no leader is needed.`,
	}
	cmd.AddCommand(newBanAddCommand(), newBanRemoveCommand(), newBanListCommand())
	return cmd
}

func newBanAddCommand() *cobra.Command {
	f := &adminFlags{}
	var (
		reason string
		ttl    time.Duration
	)
	cmd := &cobra.Command{
		Use:   "add <spiffe-id|namespace>",
		Short: "Ban a SPIFFE ID or a namespace: no certificate is issued for it",
		Long: `add bans a target at once. --reason is required: it is audited, listed,
and given to the refused workloads (never put a secret in it). --ttl lifts
the ban by itself after that long; without it the ban lasts until removed.
Banning a target already banned replaces its ban (reason and ttl).`,
		Example: `  meshctl ban add spiffe://meshca.local/ns/shop/sa/web --reason "INC-42: key leaked"
  meshctl ban add shop --reason "INC-43: namespace compromised" --ttl 24h`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if reason == "" {
				return fmt.Errorf("--reason is required: say why (an incident, a ticket); it is audited")
			}
			if ttl < 0 {
				return fmt.Errorf("--ttl %s is negative", ttl)
			}
			req := &adminv1.BanAddRequest{Target: args[0], Reason: reason, RequestedBy: operator()}
			if ttl > 0 {
				req.Ttl = durationpb.New(ttl)
			}
			return f.call(cmd, func(ctx context.Context, client adminv1.AdminServiceClient) error {
				resp, err := client.BanAdd(ctx, req)
				if err != nil {
					return fmt.Errorf("ban add: %w", err)
				}
				if f.output == "json" {
					return writeProtoJSON(cmd.OutOrStdout(), resp)
				}
				verb := "banned"
				if resp.GetReplaced() {
					verb = "ban replaced:"
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s %s %s, %s\n", verb, resp.GetBan().GetKind(), resp.GetBan().GetTarget(), expires(resp.GetBan()))
				return nil
			})
		},
	}
	f.register(cmd)
	cmd.Flags().StringVar(&reason, "reason", "", "why (required; audited and shown to refused workloads)")
	cmd.Flags().DurationVar(&ttl, "ttl", 0, "lift the ban by itself after this long (default: until removed)")
	return cmd
}

func newBanRemoveCommand() *cobra.Command {
	f := &adminFlags{}
	cmd := &cobra.Command{
		Use:     "remove <spiffe-id|namespace>",
		Short:   "Lift a ban",
		Example: `  meshctl ban remove shop`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return f.call(cmd, func(ctx context.Context, client adminv1.AdminServiceClient) error {
				resp, err := client.BanRemove(ctx, &adminv1.BanRemoveRequest{Target: args[0], RequestedBy: operator()})
				if err != nil {
					return fmt.Errorf("ban remove: %w", err)
				}
				if f.output == "json" {
					return writeProtoJSON(cmd.OutOrStdout(), resp)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "ban lifted: %s %s\n", resp.GetBan().GetKind(), resp.GetBan().GetTarget())
				return nil
			})
		},
	}
	f.register(cmd)
	return cmd
}

func newBanListCommand() *cobra.Command {
	f := &adminFlags{}
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the bans in force",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return f.call(cmd, func(ctx context.Context, client adminv1.AdminServiceClient) error {
				resp, err := client.BanList(ctx, &adminv1.BanListRequest{})
				if err != nil {
					return fmt.Errorf("ban list: %w", err)
				}
				if f.output == "json" {
					return writeProtoJSON(cmd.OutOrStdout(), resp)
				}
				printBans(cmd.OutOrStdout(), resp.GetBans())
				return nil
			})
		},
	}
	f.register(cmd)
	return cmd
}

func printBans(w io.Writer, bans []*adminv1.Ban) {
	if len(bans) == 0 {
		fmt.Fprintln(w, "no bans in force")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TARGET\tKIND\tSINCE\tEXPIRES\tBY\tREASON")
	for _, b := range bans {
		exp := "never"
		if b.GetExpiresAt() != nil {
			exp = ts(b.GetExpiresAt())
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", b.GetTarget(), b.GetKind(), ts(b.GetCreatedAt()), exp, b.GetCreatedBy(), b.GetReason())
	}
	tw.Flush()
}

func expires(b *adminv1.Ban) string {
	if b.GetExpiresAt() == nil {
		return "until removed"
	}
	return "until " + ts(b.GetExpiresAt())
}

// operator names who runs meshctl, for the audit: user@host. It is what
// meshctl says, not a proof: the admin socket's mode is the access control.
func operator() string {
	name := "unknown"
	if u, err := user.Current(); err == nil && u.Username != "" {
		name = u.Username
	}
	if host, err := os.Hostname(); err == nil && host != "" {
		name += "@" + host
	}
	return name
}
