//! The Postgres mirror: its own schema, migrated at connect by refinery's embedded migrations
//! (`migrations/postgres/`), and one transaction per batch of multi-row upserts
//! (`INSERT … SELECT FROM unnest(…) ON CONFLICT … DO UPDATE`), so a replayed batch changes
//! nothing.

use async_trait::async_trait;
use tokio_postgres::Client;
use weldr_storage::outbox::{Batch, Change};

use super::Sink;

mod embedded {
    refinery::embed_migrations!("migrations/postgres");
}

pub struct PostgresSink {
    url: String,
    schema: String,
    events: bool,
    client: Option<Client>,
}

impl PostgresSink {
    pub fn new(url: String, schema: String, events: bool) -> Self {
        Self {
            url,
            schema,
            events,
            client: None,
        }
    }

    async fn client(&mut self) -> Result<&mut Client, String> {
        if self.client.is_none() {
            let mut client = crate::pgconn::connect(&self.url)
                .await
                .map_err(|e| e.to_string())?;
            // The schema is a checked SQL identifier (config); quoted all the same.
            client
                .batch_execute(&format!(
                    "CREATE SCHEMA IF NOT EXISTS \"{0}\"; SET search_path TO \"{0}\"",
                    self.schema
                ))
                .await
                .map_err(|e| format!("creating schema {}: {}", self.schema, pg_error(&e)))?;
            embedded::migrations::runner()
                .run_async(&mut client)
                .await
                .map_err(|e| format!("migrating schema {}: {e}", self.schema))?;
            self.client = Some(client);
        }
        self.client.as_mut().ok_or_else(|| "no connection".into())
    }
}

use crate::pgconn::explain as pg_error;

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn num(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// Column arrays of one table's upserts and the keys of its removals.
#[derive(Default)]
struct Rows {
    projects: ProjectRows,
    project_dels: Vec<String>,
    branches: BranchRows,
    branch_dels: (Vec<String>, Vec<String>),
    sync: SyncRows,
    sync_dels: (Vec<String>, Vec<String>),
    versions: VersionRows,
    version_dels: (Vec<String>, Vec<String>, Vec<i64>),
    workflows: WorkflowRows,
    workflow_dels: Vec<String>,
    jobs: JobRows,
}

#[derive(Default)]
struct ProjectRows {
    id: Vec<String>,
    title: Vec<Option<String>>,
    owner: Vec<Option<String>>,
    created: Vec<i64>,
}

#[derive(Default)]
struct BranchRows {
    p: Vec<String>,
    b: Vec<String>,
    parent: Vec<Option<String>>,
    fork: Vec<Option<i64>>,
    state: Vec<String>,
    size: Vec<i64>,
    head: Vec<Option<i64>>,
    created: Vec<i64>,
    access: Vec<i64>,
}

#[derive(Default)]
struct SyncRows {
    p: Vec<String>,
    b: Vec<String>,
    dirty: Vec<bool>,
    snapshot: Vec<Option<String>>,
    last_sync: Vec<Option<i64>>,
    files: Vec<i64>,
    bytes: Vec<i64>,
    error: Vec<Option<String>>,
}

#[derive(Default)]
struct VersionRows {
    p: Vec<String>,
    b: Vec<String>,
    seq: Vec<i64>,
    hash: Vec<String>,
    message: Vec<String>,
    description: Vec<Option<String>>,
    kind: Vec<String>,
    author: Vec<String>,
    restores: Vec<Option<i64>>,
    workflow: Vec<Option<String>>,
    changed: Vec<String>,
    created: Vec<i64>,
}

#[derive(Default)]
struct WorkflowRows {
    id: Vec<String>,
    p: Vec<String>,
    b: Vec<String>,
    status: Vec<String>,
    model: Vec<String>,
    message: Vec<String>,
    plan: Vec<Option<String>>,
    tasks: Vec<String>,
    usage: Vec<String>,
    version: Vec<Option<i64>>,
    error: Vec<Option<String>>,
    reply: Vec<Option<String>>,
    created: Vec<i64>,
    updated: Vec<i64>,
}

#[derive(Default)]
struct JobRows {
    id: Vec<String>,
    p: Vec<String>,
    b: Vec<String>,
    seq: Vec<i64>,
    key: Vec<String>,
    options: Vec<String>,
    status: Vec<String>,
    message: Vec<Option<String>>,
    version: Vec<Option<i64>>,
    workflow: Vec<Option<String>>,
    created: Vec<i64>,
    updated: Vec<i64>,
}

impl Rows {
    fn add(&mut self, change: &Change) {
        match change {
            Change::Project { project_id, record } => match record {
                Some(r) => {
                    let t = &mut self.projects;
                    t.id.push(project_id.clone());
                    t.title.push(r.title.clone());
                    t.owner.push(r.owner.clone());
                    t.created.push(ms(r.created_at_ms));
                }
                None => self.project_dels.push(project_id.clone()),
            },
            Change::Branch {
                project_id,
                branch_id,
                record,
            } => match record {
                Some(r) => {
                    let t = &mut self.branches;
                    t.p.push(project_id.clone());
                    t.b.push(branch_id.clone());
                    t.parent.push(r.parent_branch_id.clone());
                    t.fork.push(r.fork_version.map(num));
                    t.state.push(r.state.as_str().into());
                    t.size.push(num(r.size_bytes));
                    t.head.push(r.head_version.map(num));
                    t.created.push(ms(r.created_at_ms));
                    t.access.push(ms(r.last_access_ms));
                }
                None => {
                    self.branch_dels.0.push(project_id.clone());
                    self.branch_dels.1.push(branch_id.clone());
                }
            },
            Change::SyncState {
                project_id,
                branch_id,
                record,
            } => match record {
                Some(r) => {
                    let t = &mut self.sync;
                    t.p.push(project_id.clone());
                    t.b.push(branch_id.clone());
                    t.dirty.push(r.dirty);
                    t.snapshot.push(r.snapshot_id.clone());
                    t.last_sync.push(r.last_sync_ms.map(ms));
                    t.files.push(num(r.files));
                    t.bytes.push(num(r.bytes));
                    t.error.push(r.last_error.clone());
                }
                None => {
                    self.sync_dels.0.push(project_id.clone());
                    self.sync_dels.1.push(branch_id.clone());
                }
            },
            Change::Version {
                project_id,
                branch_id,
                seq,
                record,
            } => match record {
                Some(r) => {
                    let t = &mut self.versions;
                    t.p.push(project_id.clone());
                    t.b.push(branch_id.clone());
                    t.seq.push(num(*seq));
                    t.hash.push(r.commit_hash.clone());
                    t.message.push(r.message.clone());
                    t.description.push(r.description.clone());
                    t.kind.push(r.kind.as_str().into());
                    t.author.push(r.author.clone());
                    t.restores.push(r.restores.map(num));
                    t.workflow.push(r.workflow_id.clone());
                    let changed: Vec<serde_json::Value> = r
                        .changed
                        .iter()
                        .map(|c| {
                            serde_json::json!({
                                "path": c.path,
                                "kind": format!("{:?}", c.kind).to_ascii_lowercase(),
                            })
                        })
                        .collect();
                    t.changed.push(json(&changed));
                    t.created.push(ms(r.created_at_ms));
                }
                None => {
                    self.version_dels.0.push(project_id.clone());
                    self.version_dels.1.push(branch_id.clone());
                    self.version_dels.2.push(num(*seq));
                }
            },
            Change::Workflow {
                workflow_id,
                record,
            } => match record {
                Some(r) => {
                    let t = &mut self.workflows;
                    t.id.push(workflow_id.clone());
                    t.p.push(r.project_id.clone());
                    t.b.push(r.branch_id.clone());
                    t.status.push(r.status.as_str().into());
                    t.model.push(r.model.clone());
                    t.message.push(r.user_message.clone());
                    t.plan.push(r.plan.as_ref().map(json));
                    let tasks: Vec<serde_json::Value> = r
                        .tasks
                        .iter()
                        .map(|s| {
                            serde_json::json!({
                                "id": s.id, "status": s.status.as_str(), "attempts": s.attempts,
                            })
                        })
                        .collect();
                    t.tasks.push(json(&tasks));
                    t.usage.push(json(&serde_json::json!({
                        "inputTokens": r.input_tokens,
                        "outputTokens": r.output_tokens,
                        "cacheReadTokens": r.cache_read_tokens,
                        "cacheWriteTokens": r.cache_write_tokens,
                    })));
                    t.version.push(r.version.map(num));
                    t.error.push(r.error.clone());
                    t.reply.push(r.reply.clone());
                    t.created.push(ms(r.created_at_ms));
                    t.updated.push(ms(r.updated_at_ms));
                }
                None => self.workflow_dels.push(workflow_id.clone()),
            },
            Change::IntegrationJob {
                project_id,
                branch_id,
                seq,
                record,
            } => {
                // Jobs are never removed from the queue; a missing one has nothing to mirror.
                if let Some(r) = record {
                    let t = &mut self.jobs;
                    t.id.push(r.job_id.clone());
                    t.p.push(project_id.clone());
                    t.b.push(branch_id.clone());
                    t.seq.push(num(*seq));
                    t.key.push(r.key.clone());
                    let options = serde_json::from_str::<serde_json::Value>(&r.options_json)
                        .unwrap_or(serde_json::Value::Null);
                    t.options.push(json(&options));
                    t.status.push(r.status.as_str().into());
                    t.message.push(r.message.clone());
                    t.version.push(r.version.map(num));
                    t.workflow.push(r.workflow_id.clone());
                    t.created.push(ms(r.created_at_ms));
                    t.updated.push(ms(r.updated_at_ms));
                }
            }
        }
    }
}

/// `to_timestamp` of a column of milliseconds.
const TS: &str = "to_timestamp";

async fn write_rows(
    tx: &tokio_postgres::Transaction<'_>,
    rows: &Rows,
) -> Result<(), tokio_postgres::Error> {
    let p = &rows.projects;
    if !p.id.is_empty() {
        tx.execute(
            &format!(
                "INSERT INTO projects (project_id, title, owner, created_at) \
                 SELECT id, title, owner, {TS}(created / 1000.0) \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[]) AS t(id, title, owner, created) \
                 ON CONFLICT (project_id) DO UPDATE SET title = EXCLUDED.title, owner = EXCLUDED.owner, \
                 created_at = EXCLUDED.created_at, mirrored_at = now()"
            ),
            &[&p.id, &p.title, &p.owner, &p.created],
        )
        .await?;
    }
    if !rows.project_dels.is_empty() {
        tx.execute(
            "DELETE FROM projects WHERE project_id = ANY($1::text[])",
            &[&rows.project_dels],
        )
        .await?;
    }
    let b = &rows.branches;
    if !b.p.is_empty() {
        tx.execute(
            &format!(
                "INSERT INTO branches (project_id, branch_id, parent_branch_id, fork_version, state, size_bytes, head_version, created_at, last_access_at) \
                 SELECT p, b, parent, fork, state, size, head, {TS}(created / 1000.0), {TS}(access / 1000.0) \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::int8[], $7::int8[], $8::int8[], $9::int8[]) \
                 AS t(p, b, parent, fork, state, size, head, created, access) \
                 ON CONFLICT (project_id, branch_id) DO UPDATE SET parent_branch_id = EXCLUDED.parent_branch_id, \
                 fork_version = EXCLUDED.fork_version, state = EXCLUDED.state, size_bytes = EXCLUDED.size_bytes, \
                 head_version = EXCLUDED.head_version, created_at = EXCLUDED.created_at, \
                 last_access_at = EXCLUDED.last_access_at, mirrored_at = now()"
            ),
            &[&b.p, &b.b, &b.parent, &b.fork, &b.state, &b.size, &b.head, &b.created, &b.access],
        )
        .await?;
    }
    if !rows.branch_dels.0.is_empty() {
        tx.execute(
            "DELETE FROM branches USING unnest($1::text[], $2::text[]) AS t(p, b) \
             WHERE project_id = t.p AND branch_id = t.b",
            &[&rows.branch_dels.0, &rows.branch_dels.1],
        )
        .await?;
    }
    let s = &rows.sync;
    if !s.p.is_empty() {
        tx.execute(
            &format!(
                "INSERT INTO branch_sync (project_id, branch_id, dirty, snapshot_id, last_sync_at, files, bytes, last_error) \
                 SELECT p, b, dirty, snap, {TS}(last / 1000.0), files, bytes, err \
                 FROM unnest($1::text[], $2::text[], $3::bool[], $4::text[], $5::int8[], $6::int8[], $7::int8[], $8::text[]) \
                 AS t(p, b, dirty, snap, last, files, bytes, err) \
                 ON CONFLICT (project_id, branch_id) DO UPDATE SET dirty = EXCLUDED.dirty, \
                 snapshot_id = EXCLUDED.snapshot_id, last_sync_at = EXCLUDED.last_sync_at, files = EXCLUDED.files, \
                 bytes = EXCLUDED.bytes, last_error = EXCLUDED.last_error, mirrored_at = now()"
            ),
            &[&s.p, &s.b, &s.dirty, &s.snapshot, &s.last_sync, &s.files, &s.bytes, &s.error],
        )
        .await?;
    }
    if !rows.sync_dels.0.is_empty() {
        tx.execute(
            "DELETE FROM branch_sync USING unnest($1::text[], $2::text[]) AS t(p, b) \
             WHERE project_id = t.p AND branch_id = t.b",
            &[&rows.sync_dels.0, &rows.sync_dels.1],
        )
        .await?;
    }
    let v = &rows.versions;
    if !v.p.is_empty() {
        tx.execute(
            &format!(
                "INSERT INTO versions (project_id, branch_id, seq, commit_hash, message, description, kind, author, restores, workflow_id, changed, created_at) \
                 SELECT p, b, seq, hash, msg, descr, kind, author, restores, wf, changed::jsonb, {TS}(created / 1000.0) \
                 FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::int8[], $10::text[], $11::text[], $12::int8[]) \
                 AS t(p, b, seq, hash, msg, descr, kind, author, restores, wf, changed, created) \
                 ON CONFLICT (project_id, branch_id, seq) DO UPDATE SET commit_hash = EXCLUDED.commit_hash, \
                 message = EXCLUDED.message, description = EXCLUDED.description, kind = EXCLUDED.kind, \
                 author = EXCLUDED.author, restores = EXCLUDED.restores, workflow_id = EXCLUDED.workflow_id, \
                 changed = EXCLUDED.changed, created_at = EXCLUDED.created_at, mirrored_at = now()"
            ),
            &[
                &v.p, &v.b, &v.seq, &v.hash, &v.message, &v.description, &v.kind, &v.author,
                &v.restores, &v.workflow, &v.changed, &v.created,
            ],
        )
        .await?;
    }
    if !rows.version_dels.0.is_empty() {
        tx.execute(
            "DELETE FROM versions USING unnest($1::text[], $2::text[], $3::int8[]) AS t(p, b, s) \
             WHERE project_id = t.p AND branch_id = t.b AND seq = t.s",
            &[
                &rows.version_dels.0,
                &rows.version_dels.1,
                &rows.version_dels.2,
            ],
        )
        .await?;
    }
    let w = &rows.workflows;
    if !w.id.is_empty() {
        tx.execute(
            &format!(
                "INSERT INTO workflows (workflow_id, project_id, branch_id, status, model, user_message, plan, tasks, usage, version, error, reply, created_at, updated_at) \
                 SELECT id, p, b, status, model, msg, plan::jsonb, tasks::jsonb, usage::jsonb, version, error, reply, {TS}(created / 1000.0), {TS}(updated / 1000.0) \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::int8[], $11::text[], $12::text[], $13::int8[], $14::int8[]) \
                 AS t(id, p, b, status, model, msg, plan, tasks, usage, version, error, reply, created, updated) \
                 ON CONFLICT (workflow_id) DO UPDATE SET status = EXCLUDED.status, model = EXCLUDED.model, \
                 user_message = EXCLUDED.user_message, plan = EXCLUDED.plan, tasks = EXCLUDED.tasks, \
                 usage = EXCLUDED.usage, version = EXCLUDED.version, error = EXCLUDED.error, \
                 reply = EXCLUDED.reply, updated_at = EXCLUDED.updated_at, mirrored_at = now()"
            ),
            &[
                &w.id, &w.p, &w.b, &w.status, &w.model, &w.message, &w.plan, &w.tasks, &w.usage,
                &w.version, &w.error, &w.reply, &w.created, &w.updated,
            ],
        )
        .await?;
    }
    if !rows.workflow_dels.is_empty() {
        tx.execute(
            "DELETE FROM workflows WHERE workflow_id = ANY($1::text[])",
            &[&rows.workflow_dels],
        )
        .await?;
    }
    let j = &rows.jobs;
    if !j.id.is_empty() {
        tx.execute(
            &format!(
                "INSERT INTO integration_jobs (job_id, project_id, branch_id, seq, key, options, status, message, version, workflow_id, created_at, updated_at) \
                 SELECT id, p, b, seq, key, options::jsonb, status, msg, version, wf, {TS}(created / 1000.0), {TS}(updated / 1000.0) \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::text[], $8::text[], $9::int8[], $10::text[], $11::int8[], $12::int8[]) \
                 AS t(id, p, b, seq, key, options, status, msg, version, wf, created, updated) \
                 ON CONFLICT (job_id) DO UPDATE SET status = EXCLUDED.status, message = EXCLUDED.message, \
                 version = EXCLUDED.version, options = EXCLUDED.options, updated_at = EXCLUDED.updated_at, \
                 mirrored_at = now()"
            ),
            &[
                &j.id, &j.p, &j.b, &j.seq, &j.key, &j.options, &j.status, &j.message, &j.version,
                &j.workflow, &j.created, &j.updated,
            ],
        )
        .await?;
    }
    Ok(())
}

#[async_trait]
impl Sink for PostgresSink {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn reset(&mut self) {
        self.client = None;
    }

    async fn write(&mut self, batch: &Batch, resync: &[Change]) -> Result<(), String> {
        let events = self.events;
        let client = self.client().await?;
        let result = async {
            let tx = client.transaction().await?;
            if let Some((from, to)) = batch.gap {
                tx.execute(
                    "INSERT INTO gaps (from_seq, to_seq) VALUES ($1, $2)",
                    &[&num(from), &num(to)],
                )
                .await?;
            }
            let mut rows = Rows::default();
            for change in resync.iter().chain(&batch.changes) {
                rows.add(change);
            }
            write_rows(&tx, &rows).await?;
            if events && !batch.events.is_empty() {
                let n = batch.event_count();
                let (mut p, mut b, mut id, mut kind, mut data, mut at) = (
                    Vec::with_capacity(n),
                    Vec::with_capacity(n),
                    Vec::with_capacity(n),
                    Vec::with_capacity(n),
                    Vec::with_capacity(n),
                    Vec::with_capacity(n),
                );
                for (stream, evs) in &batch.events {
                    for e in evs {
                        p.push(stream.project_id());
                        b.push(stream.branch_id());
                        id.push(num(e.id));
                        kind.push(e.kind.as_str());
                        data.push(e.data.as_str());
                        at.push(ms(e.at_ms));
                    }
                }
                tx.execute(
                    &format!(
                        "INSERT INTO events (project_id, branch_id, id, type, data, at) \
                         SELECT p, b, id, type, data::jsonb, {TS}(at / 1000.0) \
                         FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::int8[]) \
                         AS t(p, b, id, type, data, at) \
                         ON CONFLICT (project_id, branch_id, id) DO NOTHING"
                    ),
                    &[&p, &b, &id, &kind, &data, &at],
                )
                .await?;
            }
            tx.commit().await
        }
        .await;
        result.map_err(|e| {
            // A broken connection is opened again; a refused statement may be too.
            self.client = None;
            pg_error(&e)
        })
    }
}
