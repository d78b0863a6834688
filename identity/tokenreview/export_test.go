package tokenreview

// ParseJWT exposes the JWT shape and expiry parser to the fuzz test.
var ParseJWT = parseJWT

// OnJoin has a call f when a caller joins a review under way.
func OnJoin(a *Authenticator, f func()) { a.joined = f }
