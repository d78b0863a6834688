package server

import (
	"context"
	"errors"
	"fmt"
	"net"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// adminPeer is the local process at the other end of the admin socket,
// as the kernel tells (SO_PEERCRED on Linux): who took a ban, beyond what
// meshctl declares.
type adminPeer struct {
	credentials.CommonAuthInfo
	uid, pid int
	known    bool
}

// AuthType implements credentials.AuthInfo.
func (adminPeer) AuthType() string { return "unix-peer" }

// String names the peer for audit lines and the ban's author.
func (p adminPeer) String() string {
	if !p.known {
		return "uid unknown"
	}
	return fmt.Sprintf("uid %d, pid %d", p.uid, p.pid)
}

// adminPeerCreds are the admin server's transport credentials: no
// security of their own (the socket's file mode is the access control),
// only the peer's user, read from the connection.
type adminPeerCreds struct{}

var _ credentials.TransportCredentials = adminPeerCreds{}

func (adminPeerCreds) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("server: admin peer credentials are for the server side")
}

func (adminPeerCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	p := adminPeer{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}}
	p.uid, p.pid, p.known = peerCred(conn)
	return conn, p, nil
}

func (adminPeerCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "insecure"}
}

func (c adminPeerCreds) Clone() credentials.TransportCredentials { return c }

func (adminPeerCreds) OverrideServerName(string) error { return nil }

// adminPeerOf returns the admin caller of ctx.
func adminPeerOf(ctx context.Context) adminPeer {
	if p, ok := peer.FromContext(ctx); ok {
		if a, ok := p.AuthInfo.(adminPeer); ok {
			return a
		}
	}
	return adminPeer{}
}
