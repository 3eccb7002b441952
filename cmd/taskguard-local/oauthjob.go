package main

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/taskguard/taskguard/internal/oauthdemo"
	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/tasks"
)

// exampleJob is the name of the example job: it refreshes a user's OAuth
// token under a lock on the user, so that concurrent refreshes do not
// invalidate each other. Its payload is {"user": "42"}.
const exampleJob = "refresh-token"

// envTokenURL names the example job's OAuth token endpoint; the runner
// serves a fake one when it is unset.
const envTokenURL = "TASKGUARD_TOKEN_URL"

// refreshTokenJob is the example job: it refreshes the user's OAuth token
// under a lock on the user, wherever the refresh is started from (this task,
// or another that guards the same call), so that concurrent refreshes cannot
// spend one refresh token twice. The task's own lock (its lock id) can be
// anything; the lock on the token is what matters. It takes that lock from
// the process's default client, which the functions share.
func refreshTokenJob(tokenURL string) tasks.JobFunc {
	r := &oauthdemo.Refresher{URL: tokenURL, Store: oauthdemo.NewStore()}
	return func(ctx context.Context, d *tasks.Delivery) error {
		var p struct {
			User string `json:"user"`
		}
		if err := d.Decode(&p); err != nil || p.User == "" {
			return tasks.Permanent(fmt.Errorf("payload must be {\"user\": \"ID\"}: %v", err))
		}
		return locking.With(ctx, "oauth-token/"+p.User, func(ctx context.Context) error {
			fence := locking.FromContext(ctx).Token()
			refreshed, err := r.Refresh(ctx, p.User, fence)
			if err != nil {
				return err
			}
			slog.InfoContext(ctx, "oauth token checked", "user", p.User, "refreshed", refreshed, "token", fence, "task", d.TaskName)
			return nil
		}, locking.MaxWait(20*time.Second))
	}
}
