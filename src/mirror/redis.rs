//! The Redis mirror: each branch's events as a stream `weldr:events:{projectId}:{branchId}`
//! (entry id `<eventId>-1`, `MAXLEN ~` the event retention), each event also published on
//! `weldr:live:{projectId}:{branchId}`, and each workflow as a hash `weldr:workflow:{id}`.
//!
//! Exactly once: before appending, the batch reads each stream's last entry and skips the
//! events it already holds; an append that races past that is refused by Redis itself (an id
//! at or below the stream's top). `rediss://` goes through rustls with the installed provider
//! and the system's roots, or the PEM roots of `REDIS_CA_FILE`.

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use weldr_storage::StreamKey;
use weldr_storage::outbox::{Batch, Change};

use super::Sink;

pub struct RedisSink {
    url: String,
    ca_file: Option<std::path::PathBuf>,
    retention: u64,
    con: Option<MultiplexedConnection>,
}

impl RedisSink {
    pub fn new(url: String, ca_file: Option<std::path::PathBuf>, retention: u64) -> Self {
        Self {
            url,
            ca_file,
            retention,
            con: None,
        }
    }

    /// Check the URL and the TLS setup without connecting (a startup error when they fail).
    pub fn check(&self) -> Result<(), String> {
        self.client().map(|_| ())
    }

    fn client(&self) -> Result<redis::Client, String> {
        let show = |e: redis::RedisError| format!("REDIS_URL: {e}");
        match &self.ca_file {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("REDIS_CA_FILE {}: {e}", path.display()))?;
                redis::Client::build_with_tls(
                    self.url.as_str(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
                .map_err(show)
            }
            None => redis::Client::open(self.url.as_str()).map_err(show),
        }
    }

    async fn con(&mut self) -> Result<MultiplexedConnection, String> {
        if let Some(con) = &self.con {
            return Ok(con.clone());
        }
        let client = self.client()?;
        let mut con = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| format!("connecting to Redis: {e}"))?;
        // A refusing server (wrong password, no permission) says so now rather than later.
        redis::cmd("PING")
            .query_async::<()>(&mut con)
            .await
            .map_err(|e| format!("Redis refused: {e}"))?;
        self.con = Some(con.clone());
        Ok(con)
    }
}

fn stream_key(stream: &StreamKey) -> String {
    format!(
        "weldr:events:{}:{}",
        stream.project_id(),
        stream.branch_id()
    )
}

/// The event id of a stream entry id `<eventId>-1`.
fn event_id(entry: &str) -> u64 {
    entry
        .split_once('-')
        .and_then(|(id, _)| id.parse().ok())
        .unwrap_or(0)
}

#[async_trait]
impl Sink for RedisSink {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn reset(&mut self) {
        self.con = None;
    }

    async fn write(&mut self, batch: &Batch, resync: &[Change]) -> Result<(), String> {
        let mut con = self.con().await?;
        let result: redis::RedisResult<()> = async {
            // Where each stream stands upstream.
            let mut tops = Vec::with_capacity(batch.events.len());
            if !batch.events.is_empty() {
                let mut pipe = redis::pipe();
                for (stream, _) in &batch.events {
                    pipe.cmd("XREVRANGE")
                        .arg(stream_key(stream))
                        .arg("+")
                        .arg("-")
                        .arg("COUNT")
                        .arg(1);
                }
                let replies: Vec<redis::streams::StreamRangeReply> =
                    pipe.query_async(&mut con).await?;
                tops = replies
                    .iter()
                    .map(|r| r.ids.first().map_or(0, |e| event_id(&e.id)))
                    .collect();
            }
            let mut pipe = redis::pipe();
            let mut commands = 0usize;
            if let Some((from, to)) = batch.gap {
                pipe.cmd("XADD")
                    .arg("weldr:gaps")
                    .arg("*")
                    .arg("fromSeq")
                    .arg(from)
                    .arg("toSeq")
                    .arg(to)
                    .ignore();
                commands += 1;
            }
            for ((stream, events), top) in batch.events.iter().zip(tops) {
                let key = stream_key(stream);
                let live = format!("weldr:live:{}:{}", stream.project_id(), stream.branch_id());
                for e in events.iter().filter(|e| e.id > top) {
                    pipe.cmd("XADD")
                        .arg(&key)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(self.retention)
                        .arg(format!("{}-1", e.id))
                        .arg("type")
                        .arg(&e.kind)
                        .arg("data")
                        .arg(&e.data)
                        .arg("at")
                        .arg(e.at_ms)
                        .ignore();
                    let message = format!(
                        "{{\"id\":{},\"type\":{},\"data\":{},\"at\":{}}}",
                        e.id,
                        serde_json::Value::String(e.kind.clone()),
                        e.data,
                        e.at_ms
                    );
                    pipe.cmd("PUBLISH").arg(&live).arg(message).ignore();
                    commands += 2;
                }
            }
            for change in resync.iter().chain(&batch.changes) {
                let Change::Workflow {
                    workflow_id,
                    record,
                } = change
                else {
                    continue;
                };
                let key = format!("weldr:workflow:{workflow_id}");
                commands += 1;
                match record {
                    Some(r) => {
                        pipe.cmd("HSET")
                            .arg(&key)
                            .arg("projectId")
                            .arg(&r.project_id)
                            .arg("branchId")
                            .arg(&r.branch_id)
                            .arg("status")
                            .arg(r.status.as_str())
                            .arg("model")
                            .arg(&r.model)
                            .arg("error")
                            .arg(r.error.as_deref().unwrap_or(""))
                            .arg("version")
                            .arg(r.version.map(|v| v.to_string()).unwrap_or_default())
                            .arg("inputTokens")
                            .arg(r.input_tokens)
                            .arg("outputTokens")
                            .arg(r.output_tokens)
                            .arg("updatedAt")
                            .arg(r.updated_at_ms)
                            .ignore();
                    }
                    None => {
                        pipe.cmd("DEL").arg(&key).ignore();
                    }
                }
            }
            if commands > 0 {
                pipe.query_async::<()>(&mut con).await?;
            }
            Ok(())
        }
        .await;
        result.map_err(|e| {
            if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                self.con = None;
            }
            format!("Redis: {e}")
        })
    }
}
