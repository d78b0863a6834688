package ca_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca"
)

func TestTTLPolicy(t *testing.T) {
	tests := []struct {
		name      string
		policy    ca.TTLPolicy
		requested time.Duration
		want      time.Duration
	}{
		{name: "zero policy, zero request is the default", requested: 0, want: time.Hour},
		{name: "zero policy, negative request is the default", requested: -time.Minute, want: time.Hour},
		{name: "zero policy, short request", requested: 5 * time.Minute, want: 5 * time.Minute},
		{name: "zero policy, request of the maximum", requested: 24 * time.Hour, want: 24 * time.Hour},
		{name: "zero policy, long request is clamped", requested: 48 * time.Hour, want: 24 * time.Hour},
		{name: "zero policy, one nanosecond over the maximum", requested: 24*time.Hour + 1, want: 24 * time.Hour},
		{
			name:      "custom default",
			policy:    ca.TTLPolicy{Default: 10 * time.Minute, Max: 2 * time.Hour},
			requested: 0,
			want:      10 * time.Minute,
		},
		{
			name:      "custom default for a negative request",
			policy:    ca.TTLPolicy{Default: 10 * time.Minute, Max: 2 * time.Hour},
			requested: -time.Hour,
			want:      10 * time.Minute,
		},
		{
			name:      "custom, request within bounds",
			policy:    ca.TTLPolicy{Default: 10 * time.Minute, Max: 2 * time.Hour},
			requested: 90 * time.Minute,
			want:      90 * time.Minute,
		},
		{
			name:      "custom maximum clamps",
			policy:    ca.TTLPolicy{Default: 10 * time.Minute, Max: 2 * time.Hour},
			requested: 3 * time.Hour,
			want:      2 * time.Hour,
		},
		{
			name:      "custom maximum above the built-in one",
			policy:    ca.TTLPolicy{Max: 72 * time.Hour},
			requested: 48 * time.Hour,
			want:      48 * time.Hour,
		},
		{
			name:      "only a custom default",
			policy:    ca.TTLPolicy{Default: 3 * time.Hour},
			requested: 0,
			want:      3 * time.Hour,
		},
		{
			name:      "only a custom default, long request still clamped at 24h",
			policy:    ca.TTLPolicy{Default: 3 * time.Hour},
			requested: 100 * time.Hour,
			want:      24 * time.Hour,
		},
		{
			name:      "only a custom maximum below the built-in default clamps the default",
			policy:    ca.TTLPolicy{Max: 30 * time.Minute},
			requested: 0,
			want:      30 * time.Minute,
		},
		{
			name:      "negative policy values mean the built-in ones",
			policy:    ca.TTLPolicy{Default: -time.Minute, Max: -time.Minute},
			requested: 0,
			want:      time.Hour,
		},
		{
			name:      "negative maximum means the built-in one",
			policy:    ca.TTLPolicy{Max: -time.Minute},
			requested: 30 * time.Hour,
			want:      24 * time.Hour,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.Equal(t, tt.want, tt.policy.TTL(tt.requested))
		})
	}
}
