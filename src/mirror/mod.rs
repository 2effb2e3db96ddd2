//! Upstream mirrors: Postgres and Redis fed from the store's outbox
//! ([`weldr_storage::outbox`]).
//!
//! redb is the truth. Every commit that changes what a mirror carries writes an outbox entry
//! in the same transaction; one [`Worker`] per sink reads the entries after its cursor in
//! batches (the values from the same snapshot), writes them upstream, and moves its cursor
//! (kept in redb) only once upstream acknowledged. Upstream writes are idempotent (upserts by
//! id; Redis stream entries with explicit ids), so a batch written again after a crash between
//! the upstream write and the cursor's changes nothing. While a sink is down or refuses, its
//! worker backs off with jitter and reports the error; the agent's own work never waits for
//! it. Entries every sink has passed are pruned; past `MIRROR_MAX_BACKLOG` the oldest are
//! dropped: the sink behind then records a *gap* upstream and resyncs every record (projects,
//! branches, versions, workflows, jobs), so only events of the dropped span can be missing
//! upstream (they stay in the agent's own log, which is what clients resume from). Dropping
//! keeps the disk bounded for a sink that never comes back; the resync keeps what the
//! dashboard and queries need correct.

pub mod postgres;
pub mod redis;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use weldr_storage::outbox::{self, Batch, Change};
use weldr_storage::{StorageError, Store};

use crate::config::Config;
use crate::worker::{Worker, WorkerState};

/// Most outbox entries per upstream batch, and the events after which a batch stops growing.
const BATCH_ENTRIES: usize = 4096;
const BATCH_EVENTS: usize = 5000;
/// Longest an upstream write may take before it counts as failed (and the connection is
/// opened again): a server that stopped answering must not stall the mirror forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest idle wait between two looks at the outbox (a missed wake-up costs no more).
const IDLE_WAIT: Duration = Duration::from_secs(5);

/// One upstream.
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Write `batch` (after `resync`, every record, when the batch follows a gap) in one
    /// upstream transaction; Ok only once upstream acknowledged it.
    async fn write(&mut self, batch: &Batch, resync: &[Change]) -> Result<(), String>;

    /// Drop the connection (a write timed out): the next write opens a new one.
    fn reset(&mut self);
}

/// How a sink is doing (`GET /mirrors`, `/health`, `status`).
#[derive(Debug, Clone, Default, Serialize, salvo::oapi::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MirrorStatus {
    /// `postgres` or `redis`.
    pub sink: String,
    /// `starting`, `ok` (caught up or catching up), `retrying` (the last write failed).
    pub state: String,
    /// The last outbox entry upstream acknowledged.
    pub cursor: u64,
    /// Outbox entries (commits) not acknowledged yet.
    pub backlog_entries: u64,
    /// Age of the oldest entry not acknowledged yet.
    pub backlog_seconds: f64,
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<u64>,
    pub last_success_at_ms: Option<u64>,
    /// From the commit of a batch's first entry to upstream's acknowledgement, last batch.
    pub last_lag_ms: Option<u64>,
    pub events_mirrored: u64,
    pub records_mirrored: u64,
    /// Spans of entries dropped before this sink read them (backlog cap).
    pub gaps: u64,
}

type Shared = Arc<Mutex<MirrorStatus>>;

/// Batch lags kept per sink (for the benchmark's percentiles).
const LAGS_KEPT: usize = 8192;
type Lags = Arc<Mutex<std::collections::VecDeque<u64>>>;

/// The configured mirrors: their statuses, and their workers until the server starts them.
pub struct Mirrors {
    store: Store,
    statuses: Vec<(&'static str, Shared)>,
    lags: Vec<Lags>,
    workers: Mutex<Vec<MirrorWorker>>,
}

impl Mirrors {
    /// The mirrors `config` asks for (None when none). Fails when a URL or its TLS setup is
    /// unusable (a startup error); an unreachable upstream is not an error here.
    pub fn new(config: &Config, store: Store) -> Result<Option<Arc<Self>>, String> {
        let settings = &config.mirror;
        let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
        if let Some(url) = &settings.postgres_url {
            crate::pgconn::check(url.expose()).map_err(|e| format!("DATABASE_URL: {e}"))?;
            sinks.push(Box::new(postgres::PostgresSink::new(
                url.expose().to_string(),
                settings.schema.clone(),
                settings.events,
            )));
        }
        if let Some(url) = &settings.redis_url {
            let sink = redis::RedisSink::new(
                url.expose().to_string(),
                config.redis_ca_file.clone(),
                config.event_retention,
            );
            sink.check()?;
            sinks.push(Box::new(sink));
        }
        if sinks.is_empty() {
            return Ok(None);
        }
        let names: Vec<&'static str> = sinks.iter().map(|s| s.name()).collect();
        let mut statuses = Vec::new();
        let mut lags = Vec::new();
        let mut workers = Vec::new();
        for sink in sinks {
            let status: Shared = Arc::new(Mutex::new(MirrorStatus {
                sink: sink.name().into(),
                state: "starting".into(),
                ..MirrorStatus::default()
            }));
            statuses.push((sink.name(), status.clone()));
            let kept: Lags = Arc::default();
            lags.push(kept.clone());
            workers.push(MirrorWorker {
                lags: kept,
                commits: store.commits(),
                store: store.clone(),
                sink,
                sinks: names.clone(),
                cap: settings.max_backlog,
                status,
            });
        }
        Ok(Some(Arc::new(Self {
            store,
            statuses,
            lags,
            workers: Mutex::new(workers),
        })))
    }

    /// The workers, once (the server starts them).
    pub fn take_workers(&self) -> Vec<MirrorWorker> {
        std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The lags of the last batches of sink `name` (ms, from the commit of a batch's first
    /// entry to upstream's acknowledgement), oldest first.
    pub fn lags(&self, name: &str) -> Vec<u64> {
        self.statuses
            .iter()
            .zip(&self.lags)
            .find(|((n, _), _)| *n == name)
            .map(|(_, l)| {
                l.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every sink's status, with its position read from the store now.
    pub async fn status(&self) -> Result<Vec<MirrorStatus>, StorageError> {
        let names: Vec<&'static str> = self.statuses.iter().map(|(n, _)| *n).collect();
        let positions = self
            .store
            .read(move |s: &Store| {
                let rtx = s.begin_read()?;
                names
                    .iter()
                    .map(|n| outbox::position(&rtx, n))
                    .collect::<Result<Vec<_>, StorageError>>()
            })
            .await?;
        let now = weldr_storage::writer::now_ms();
        Ok(self
            .statuses
            .iter()
            .zip(positions)
            .map(|((_, status), (cursor, bounds, oldest))| {
                let mut s = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
                s.cursor = cursor;
                // Entries dropped past the cap are no longer waiting.
                s.backlog_entries = bounds.next.saturating_sub((cursor + 1).max(bounds.first));
                s.backlog_seconds = oldest.map_or(0.0, |at| now.saturating_sub(at) as f64 / 1e3);
                s
            })
            .collect())
    }
}

/// One sink's worker.
pub struct MirrorWorker {
    store: Store,
    commits: tokio::sync::watch::Receiver<u64>,
    sink: Box<dyn Sink>,
    /// Every sink's name (pruning waits for all of them).
    sinks: Vec<&'static str>,
    cap: u64,
    status: Shared,
    lags: Lags,
}

impl MirrorWorker {
    fn set(&self, f: impl FnOnce(&mut MirrorStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// After a failed write: keep the outbox within the cap while nothing is acknowledged.
    async fn enforce_cap(&self, backlog: u64) {
        if backlog <= self.cap {
            return;
        }
        let cap = self.cap;
        match self
            .store
            .writer()
            .write(move |ctx| outbox::enforce_cap(ctx, cap))
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                sink = self.sink.name(),
                dropped = n,
                "mirror outbox over MIRROR_MAX_BACKLOG: the oldest entries were dropped"
            ),
            Err(e) => tracing::warn!(error = %e, "mirror outbox: dropping old entries failed"),
        }
    }
}

#[async_trait]
impl Worker for MirrorWorker {
    fn name(&self) -> &'static str {
        match self.sink.name() {
            "postgres" => "mirror-postgres",
            "redis" => "mirror-redis",
            _ => "mirror",
        }
    }

    fn detail(&self) -> Option<String> {
        let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        Some(match &s.last_error {
            Some(e) if s.state == "retrying" => format!("retrying after: {e}"),
            _ => format!(
                "cursor {}, backlog {} entries; {} events, {} records mirrored; {} gaps",
                s.cursor, s.backlog_entries, s.events_mirrored, s.records_mirrored, s.gaps
            ),
        })
    }

    async fn work(&mut self, _shutdown: &CancellationToken) -> Result<WorkerState, String> {
        let name = self.sink.name();
        let read = self
            .store
            .read(move |s: &Store| {
                let rtx = s.begin_read()?;
                let cursor = outbox::cursor(&rtx, name)?;
                let Some(batch) = outbox::read_batch(&rtx, cursor, BATCH_ENTRIES, BATCH_EVENTS)?
                else {
                    return Ok::<_, StorageError>(None);
                };
                let mut resync = Vec::new();
                if batch.gap.is_some() {
                    outbox::all_records(&rtx, &mut |c| {
                        resync.push(c);
                        Ok(())
                    })?;
                }
                Ok(Some((batch, resync)))
            })
            .await
            .map_err(|e| format!("reading the outbox: {e}"))?;
        let Some((batch, resync)) = read else {
            self.set(|s| {
                if s.state != "retrying" {
                    s.state = "ok".into();
                }
                s.backlog_entries = 0;
            });
            return Ok(WorkerState::Idle);
        };
        let written =
            match tokio::time::timeout(WRITE_TIMEOUT, self.sink.write(&batch, &resync)).await {
                Ok(result) => result,
                Err(_) => {
                    self.sink.reset();
                    Err(format!("no answer within {WRITE_TIMEOUT:?}"))
                }
            };
        if let Err(e) = written {
            self.set(|s| {
                s.state = "retrying".into();
                s.last_error = Some(e.clone());
                s.last_error_at_ms = Some(weldr_storage::writer::now_ms());
            });
            self.enforce_cap(batch.bounds.next.saturating_sub(batch.bounds.first))
                .await;
            return Err(e);
        }
        let (seq, sinks, cap) = (batch.last_seq, self.sinks.clone(), self.cap);
        let advanced = self
            .store
            .writer()
            .write(move |ctx| outbox::advance(ctx, name, seq, &sinks, cap))
            .await
            .map_err(|e| format!("storing the mirror's cursor: {e}"))?;
        if advanced.dropped > 0 {
            tracing::warn!(
                sink = name,
                dropped = advanced.dropped,
                "mirror outbox over MIRROR_MAX_BACKLOG: the oldest entries were dropped"
            );
        }
        let now = weldr_storage::writer::now_ms();
        if let Some(at) = batch.oldest_ms {
            let mut lags = self.lags.lock().unwrap_or_else(|p| p.into_inner());
            if lags.len() == LAGS_KEPT {
                lags.pop_front();
            }
            lags.push_back(now.saturating_sub(at));
        }
        self.set(|s| {
            s.state = "ok".into();
            s.cursor = batch.last_seq;
            s.backlog_entries = batch.bounds.next.saturating_sub(batch.last_seq + 1);
            s.last_success_at_ms = Some(now);
            s.last_lag_ms = batch.oldest_ms.map(|at| now.saturating_sub(at));
            s.events_mirrored += batch.event_count() as u64;
            s.records_mirrored += (batch.changes.len() + resync.len()) as u64;
            if let Some((from, to)) = batch.gap {
                s.gaps += 1;
                s.last_error = Some(format!(
                    "outbox entries {from}..={to} were dropped (MIRROR_MAX_BACKLOG) before this mirror read them: a gap was recorded upstream and every record resynced"
                ));
                s.last_error_at_ms = Some(now);
            }
        });
        if batch.trimmed > 0 {
            tracing::warn!(
                sink = name,
                events = batch.trimmed,
                "events were trimmed by the retention before the mirror read them"
            );
        }
        Ok(WorkerState::Busy)
    }

    async fn wait_for_work(&mut self) {
        let _ = tokio::time::timeout(IDLE_WAIT, self.commits.changed()).await;
    }
}
