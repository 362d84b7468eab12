-- One follower per host: the lease a follower holds on its host while it follows (core/lease.py's rules),
-- renewed by its heartbeat and fencing each batch's transaction. `holder` names the run (or process) that
-- holds or last held it: the repo_follow sensor reads it to tell a follow run whose worker is gone.
CREATE TABLE repo_stream_leases (
    host             text PRIMARY KEY,
    holder           text,
    claim_token      uuid,
    lease_expires_at timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
