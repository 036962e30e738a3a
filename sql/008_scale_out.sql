-- Scale-out: several daemons (on one host or many) share one PostgreSQL and one API budget.
-- PostgreSQL is the coordinator; nothing else is needed. Small tables, keyed without `symbol`
-- where they are global (Citus reference tables); the lease table leads with `symbol`.

-- Every running process: unique per process (host, pid and a random suffix), heartbeating.
CREATE TABLE instances (
    id           text        PRIMARY KEY,
    label        text        NOT NULL,  -- [daemon] instance (default: the host name)
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    version      text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    stopped_at   timestamptz
);

-- Who works on which series. A lease is claimed with SELECT ... FOR UPDATE SKIP LOCKED, renewed
-- while its holder works, and lapses when the holder stops renewing (SIGKILL, power loss, a
-- network split); then another instance takes it over and resumes from the coverage. `fence`
-- grows with every claim: each page's transaction checks (holder, fence) under a row lock, so
-- a paused holder that lost its lease can never commit.
CREATE TABLE series_leases (
    symbol      text        NOT NULL,
    timeframe   text        NOT NULL,
    holder      text,                   -- instances.id, NULL when free
    fence       bigint      NOT NULL DEFAULT 0,
    acquired_at timestamptz,
    expires_at  timestamptz,
    done_at     timestamptz,            -- when a holder last brought the series up to date
    done_by     text,                   -- ...and which instance that was
    CONSTRAINT series_leases_pkey PRIMARY KEY (symbol, timeframe)
);

-- The API budget of one key (by its SHA-256, never the key) across all instances: a token
-- bucket as a reservation pointer. Taking n tokens moves `next_slot` n intervals on, in one
-- statement; a 429 seen anywhere slows `effective_per_minute` for all.
CREATE TABLE api_budget (
    key_hash             text             PRIMARY KEY,
    configured_per_minute double precision NOT NULL,
    effective_per_minute double precision NOT NULL,
    next_slot            timestamptz      NOT NULL DEFAULT now(),
    paused_until         timestamptz,
    granted              bigint           NOT NULL DEFAULT 0,
    slowdowns            bigint           NOT NULL DEFAULT 0,
    updated_at           timestamptz      NOT NULL DEFAULT now()
);

-- Which process did what.
ALTER TABLE executions ADD COLUMN instance_id text;
ALTER TABLE job_results ADD COLUMN instance_id text;
CREATE INDEX executions_unfinished ON executions (instance_id) WHERE finished_at IS NULL;
