package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	adminv1 "github.com/meshca/meshca/proto/meshca/admin/v1"
)

// adminFlags are the flags of the commands that use the admin API.
type adminFlags struct {
	socket  string
	timeout time.Duration
	output  string
}

func (f *adminFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.socket, "admin-socket", ".meshca/admin.sock", "meshca-server's admin Unix socket")
	fl.DurationVar(&f.timeout, "timeout", 30*time.Second, "deadline of the request")
	fl.StringVarP(&f.output, "output", "o", "text", "output format: text or json")
}

// call runs fn with an admin client and a context bounded by --timeout.
func (f *adminFlags) call(cmd *cobra.Command, fn func(context.Context, adminv1.AdminServiceClient) error) error {
	if f.output != "text" && f.output != "json" {
		return fmt.Errorf("--output %q: want text or json", f.output)
	}
	// The socket's file mode is the access control; there is no TLS on it.
	conn, err := grpc.NewClient("unix:"+f.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("admin socket %s: %w", f.socket, err)
	}
	defer conn.Close()
	ctx, cancel := contextWithTimeout(cmd, f.timeout)
	defer cancel()
	return fn(ctx, adminv1.NewAdminServiceClient(conn))
}

func newRootRotationCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "root",
		Short: "Rotate the trust domain's root: status, prepare, activate, retire",
		Long: `A root rotation has three steps, each its own command, so that nothing
moves before the mesh is ready for it:

  prepare   a new root joins the trust bundle; it signs nothing yet. The
            bundle reaches workloads over the bundle stream, which report
            the bundle they hold on every renewal.
  activate  the new root signs, through a new intermediate; chains carry
            the new root cross-signed by the old one, which is retiring.
            Refused until every workload seen within the maximum leaf
            lifetime holds the new root, or that lifetime has passed since
            prepare (after a restart, not before half a leaf lifetime of
            tracking).
  retire    the old root leaves the bundle. Refused while a leaf under it
            can still be valid.

--force overrides a refusal (audited); --dry-run says what would happen.`,
	}
	cmd.AddCommand(
		newRootStatusCommand(),
		newAdminStepCommand("prepare", "Add a new root to the trust bundle, not signing yet", (adminv1.AdminServiceClient).PrepareRoot),
		newAdminStepCommand("activate", "Make the prepared root sign; the current root retires", (adminv1.AdminServiceClient).ActivateRoot),
		newAdminStepCommand("retire", "Remove retiring roots from the trust bundle", (adminv1.AdminServiceClient).RetireRoot),
	)
	return cmd
}

func newIntermediateCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "intermediate",
		Short: "Manage the issuing intermediate (it also rotates by itself)",
	}
	cmd.AddCommand(newAdminStepCommand("rotate", "Replace the issuing intermediate now; the bundle does not change", (adminv1.AdminServiceClient).RotateIntermediate))
	return cmd
}

func newRootStatusCommand() *cobra.Command {
	f := &adminFlags{}
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the roots, the intermediates and the propagation of a prepared root",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return f.call(cmd, func(ctx context.Context, client adminv1.AdminServiceClient) error {
				st, err := client.RootStatus(ctx, &adminv1.RootStatusRequest{})
				if err != nil {
					return fmt.Errorf("root status: %w", err)
				}
				if f.output == "json" {
					return writeProtoJSON(cmd.OutOrStdout(), st)
				}
				printRootStatus(cmd.OutOrStdout(), st)
				return nil
			})
		},
	}
	f.register(cmd)
	return cmd
}

type adminStep func(adminv1.AdminServiceClient, context.Context, *adminv1.OperationRequest, ...grpc.CallOption) (*adminv1.OperationResponse, error)

func newAdminStepCommand(use, short string, step adminStep) *cobra.Command {
	f := &adminFlags{}
	var force, dryRun bool
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return f.call(cmd, func(ctx context.Context, client adminv1.AdminServiceClient) error {
				resp, err := step(client, ctx, &adminv1.OperationRequest{Force: force, DryRun: dryRun})
				if err != nil {
					return fmt.Errorf("%s %s: %w", cmd.Parent().Name(), cmd.Name(), err)
				}
				if f.output == "json" {
					return writeProtoJSON(cmd.OutOrStdout(), resp)
				}
				out := cmd.OutOrStdout()
				if resp.GetForced() {
					fmt.Fprintln(out, "FORCED: a refusal was overridden; this is audited.")
				}
				fmt.Fprintln(out, resp.GetSummary())
				if resp.GetApplied() {
					fmt.Fprintln(out)
					printRootStatus(out, resp.GetStatus())
				}
				return nil
			})
		},
	}
	f.register(cmd)
	cmd.Flags().BoolVar(&force, "force", false, "override a refusal (audited)")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "say what would happen, change nothing")
	return cmd
}

func writeProtoJSON(w io.Writer, m proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, Indent: "  ", EmitUnpopulated: false}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(w, string(b))
	return err
}

func printRootStatus(w io.Writer, st *adminv1.RootStatusResponse) {
	fmt.Fprintf(w, "trust domain     %s\nbundle sequence  %d\nmax leaf TTL     %s\n\n", st.GetTrustDomain(), st.GetBundleSequence(), time.Duration(st.GetMaxLeafTtlSeconds())*time.Second)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KIND\tSTATE\tSERIAL\tSUBJECT\tNOT AFTER\tSINCE")
	row := func(kind string, a *adminv1.Authority) {
		if a == nil {
			return
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", kind, a.GetState(), short(a.GetSerial()), a.GetSubject(), ts(a.GetNotAfter()), ts(a.GetSince()))
	}
	for _, r := range st.GetRoots() {
		row("root", r)
	}
	row("intermediate", st.GetIssuer())
	for _, c := range st.GetChain() {
		row("chain", c)
	}
	row("intermediate", st.GetNextIssuer())
	for _, r := range st.GetRetiringIssuers() {
		row("intermediate", r)
	}
	tw.Flush()
	if p := st.GetPropagation(); p != nil {
		fmt.Fprintf(w, "\nprepared root: %d of %d workloads seen hold bundle sequence %d; activate allowed when all do, or from %s\n",
			p.GetWorkloadsHolding(), p.GetWorkloadsSeen(), p.GetBundleSequence(), ts(p.GetActivateAllowedAt()))
	}
	if r := st.GetRetireAllowedAt(); r != nil {
		fmt.Fprintf(w, "\nretiring root: retire allowed from %s\n", ts(r))
	}
	if up := st.GetUpstream(); up != nil {
		fmt.Fprintf(w, "\n%s\n", upstreamLine(up))
	}
}

// upstreamLine says how the upstream authority (Vault) has answered:
//
//	upstream: Vault at https://vault:8200, PKI mount "pki": available, last success 2026-11-22T02:10:00Z
//	upstream: Vault at https://vault:8200, PKI mount "pki": UNAVAILABLE since the last success at 2026-11-22T02:10:00Z (3 failed calls, the last at 2026-11-22T02:10:30Z), retry at 2026-11-22T02:10:34Z, last error: ...
func upstreamLine(up *adminv1.UpstreamStatus) string {
	line := "upstream: " + up.GetName() + ": "
	switch {
	case up.GetAvailable():
		line += "available, last success " + ts(up.GetLastSuccess())
	case up.GetLastFailure() == nil:
		line += "not called yet (only the replica that leads calls it)"
	default:
		since := "it started"
		if up.GetLastSuccess() != nil {
			since = "the last success at " + ts(up.GetLastSuccess())
		}
		calls := "calls"
		if up.GetConsecutiveFailures() == 1 {
			calls = "call"
		}
		line += fmt.Sprintf("UNAVAILABLE since %s (%d failed %s, the last at %s)",
			since, up.GetConsecutiveFailures(), calls, ts(up.GetLastFailure()))
	}
	if next := up.GetNextAttempt(); next != nil {
		if up.GetAvailable() {
			line += ", next check at " + ts(next)
		} else {
			line += ", retry at " + ts(next)
		}
	}
	if !up.GetAvailable() && up.GetLastError() != "" {
		line += ", last error: " + up.GetLastError()
	}
	return line
}

func ts(t *timestamppb.Timestamp) string {
	if t == nil {
		return "-"
	}
	return t.AsTime().UTC().Format(time.RFC3339)
}

func short(serial string) string {
	if len(serial) > 12 {
		return serial[:12] + "…"
	}
	return strings.ToLower(serial)
}
