// Command meshctl is meshca's command line: get a certificate, inspect
// one, print the trust bundle, benchmark a server, rotate the root,
// federate with other trust domains and ban identities.
package main

import (
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
)

func main() {
	if err := newRootCommand(os.Stdout, os.Stderr).Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "meshctl:", err)
		os.Exit(1)
	}
}

func newRootCommand(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:           "meshctl",
		Short:         "Operate and use a meshca certificate authority",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(
		newIssueCommand(),
		newInspectCommand(),
		newBundleCommand(),
		newBenchCommand(),
		newRootRotationCommand(),
		newIntermediateCommand(),
		newFederationCommand(),
		newBanCommand(),
	)
	return root
}
