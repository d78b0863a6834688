package server

import (
	"net"
	"sync"
)

// LimitListener returns l bounded to Limits.MaxConnectionsPerSource open
// connections from one source: a connection over the bound is closed as
// soon as it is accepted, before any TLS work, and counted in
// meshca_limit_refused_total{what="connection"}. The caller sees its
// connection closed (gRPC's Unavailable) and may retry once it closes
// another. With no bound, LimitListener returns l itself.
func (s *Server) LimitListener(l net.Listener) net.Listener {
	if s.limits.conns == nil {
		return l
	}
	return &limitListener{Listener: l, limits: s.limits}
}

type limitListener struct {
	net.Listener
	limits *limiter
}

// Accept returns the next connection within the bound; the others are
// closed and never returned, so that the server's accept loop does not
// back off on them.
func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		src := sourceOf(c.RemoteAddr())
		if !l.limits.conns.acquire(src) {
			l.limits.refused.WithLabelValues("connection").Inc()
			c.Close()
			continue
		}
		l.limits.connsOpen.Inc()
		return &limitConn{Conn: c, release: sync.OnceFunc(func() {
			l.limits.conns.release(src)
			l.limits.connsOpen.Dec()
		})}, nil
	}
}

// limitConn releases its count once, on the first Close.
type limitConn struct {
	net.Conn
	release func()
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.release()
	return err
}
