package files

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"
)

// maxOutput is how much of the end of a command's output is kept for the
// log of a failure.
const maxOutput = 4 << 10

// waitDelay bounds the wait for a killed command's output pipes, held
// open by a child it left behind.
const waitDelay = 2 * time.Second

// runCommand runs the command, if any, with the timeout; a failure is
// logged and counted, never returned.
func (w *Writer) runCommand(ctx context.Context) {
	if len(w.command) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, w.timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, w.command[0], w.command[1:]...)
	cmd.Dir = w.dir
	cmd.Env = append(os.Environ(),
		"MESHCA_CERT_FILE="+filepath.Join(w.dir, w.certName),
		"MESHCA_KEY_FILE="+filepath.Join(w.dir, w.keyName),
		"MESHCA_BUNDLE_FILE="+filepath.Join(w.dir, w.bdlName),
	)
	out := &tailBuffer{max: maxOutput}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.WaitDelay = waitDelay
	killGroup(cmd)
	start := time.Now()
	err := cmd.Run()
	elapsed := time.Since(start)
	switch {
	case err == nil:
		w.metrics.commands.WithLabelValues("ok").Inc()
		w.log.LogAttrs(ctx, slog.LevelInfo, "command run after the files changed", slog.Any("command", w.command), slog.Duration("took", elapsed))
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		w.metrics.commands.WithLabelValues("timeout").Inc()
		w.log.LogAttrs(ctx, slog.LevelError, "the command run after the files changed timed out and was killed",
			slog.Any("command", w.command), slog.Duration("timeout", w.timeout), slog.String("output", out.String()))
	default:
		w.metrics.commands.WithLabelValues("failed").Inc()
		w.log.LogAttrs(ctx, slog.LevelError, "the command run after the files changed failed",
			slog.Any("command", w.command), slog.Any("error", err), slog.String("output", out.String()))
	}
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	if over := len(b.buf) - b.max; over > 0 {
		b.buf = append(b.buf[:0], b.buf[over:]...)
	}
	return len(p), nil
}

func (b *tailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.buf)
}
