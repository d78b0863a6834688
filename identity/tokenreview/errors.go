package tokenreview

import (
	"fmt"

	"github.com/meshca/meshca/identity"
)

// authError returns an error that identity.Chain and the server edge read,
// with errors.As, as an *identity.AuthError of reason. msg must not hold
// the token.
//
// identity.AuthError's message is unexported, so the message lives in
// this wrapper until identity exports a constructor; the *AuthError in the
// chain carries only the reason.
func authError(reason identity.AuthReason, cause error, format string, args ...any) error {
	return &reviewError{
		reason: &identity.AuthError{Reason: reason},
		msg:    fmt.Sprintf(format, args...),
		err:    cause,
	}
}

type reviewError struct {
	reason *identity.AuthError
	msg    string
	err    error
}

func (e *reviewError) Error() string {
	if e.err != nil {
		return "tokenreview: " + e.msg + ": " + e.err.Error()
	}
	return "tokenreview: " + e.msg
}

func (e *reviewError) Unwrap() []error {
	if e.err != nil {
		return []error{e.reason, e.err}
	}
	return []error{e.reason}
}
