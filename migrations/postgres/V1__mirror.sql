-- The agent's mirror: redb is the truth; these tables follow it (idempotent upserts by id).
-- Applied by refinery inside the mirror's own schema (MIRROR_SCHEMA, `weldr_agent` by default).

CREATE TABLE projects (
    project_id   text PRIMARY KEY,
    title        text,
    owner        text,
    created_at   timestamptz NOT NULL,
    mirrored_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE branches (
    project_id       text NOT NULL,
    branch_id        text NOT NULL,
    parent_branch_id text,
    fork_version     bigint,
    state            text NOT NULL,
    size_bytes       bigint NOT NULL,
    head_version     bigint,
    created_at       timestamptz NOT NULL,
    last_access_at   timestamptz NOT NULL,
    mirrored_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, branch_id)
);

-- The object-storage sync state of a branch (kept apart: it changes often).
CREATE TABLE branch_sync (
    project_id    text NOT NULL,
    branch_id     text NOT NULL,
    dirty         boolean NOT NULL,
    snapshot_id   text,
    last_sync_at  timestamptz,
    files         bigint NOT NULL,
    bytes         bigint NOT NULL,
    last_error    text,
    mirrored_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, branch_id)
);

CREATE TABLE versions (
    project_id   text NOT NULL,
    branch_id    text NOT NULL,
    seq          bigint NOT NULL,
    commit_hash  text NOT NULL,
    message      text NOT NULL,
    description  text,
    kind         text NOT NULL,
    author       text NOT NULL,
    restores     bigint,
    workflow_id  text,
    changed      jsonb NOT NULL,
    created_at   timestamptz NOT NULL,
    mirrored_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, branch_id, seq)
);

CREATE TABLE workflows (
    workflow_id   text PRIMARY KEY,
    project_id    text NOT NULL,
    branch_id     text NOT NULL,
    status        text NOT NULL,
    model         text NOT NULL,
    user_message  text NOT NULL,
    plan          jsonb,
    tasks         jsonb NOT NULL,
    usage         jsonb NOT NULL,
    version       bigint,
    error         text,
    reply         text,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    mirrored_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX workflows_branch ON workflows (project_id, branch_id, created_at);

CREATE TABLE integration_jobs (
    job_id       text PRIMARY KEY,
    project_id   text NOT NULL,
    branch_id    text NOT NULL,
    seq          bigint NOT NULL,
    key          text NOT NULL,
    options      jsonb NOT NULL,
    status       text NOT NULL,
    message      text,
    version      bigint,
    workflow_id  text,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    mirrored_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX integration_jobs_branch ON integration_jobs (project_id, branch_id, seq);

-- Filled only with MIRROR_EVENTS=on.
CREATE TABLE events (
    project_id  text NOT NULL,
    branch_id   text NOT NULL,
    id          bigint NOT NULL,
    type        text NOT NULL,
    data        jsonb NOT NULL,
    at          timestamptz NOT NULL,
    PRIMARY KEY (project_id, branch_id, id)
);

-- Outbox entries dropped before this mirror read them (MIRROR_MAX_BACKLOG): the records were
-- resynced afterwards; events in between may be missing here (they stay in the agent's log).
CREATE TABLE gaps (
    id          bigserial PRIMARY KEY,
    from_seq    bigint NOT NULL,
    to_seq      bigint NOT NULL,
    noted_at    timestamptz NOT NULL DEFAULT now()
);
