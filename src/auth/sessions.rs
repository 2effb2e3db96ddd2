//! Better Auth sessions: looked up in Postgres, cached in redb until they expire.
//!
//! The cache is read first, so a Postgres outage does not lock out a user whose session is
//! cached. A cached entry older than [`RECHECK_AFTER_MS`] is checked against Postgres again
//! when Postgres answers, so a session revoked upstream stops working within that time.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use weldr_storage::record::{Record, decode, encode};
use weldr_storage::tables::SESSIONS;
use weldr_storage::writer::now_ms;
use weldr_storage::{StorageError, Store};

/// Cached sessions are re-validated upstream after this long (when upstream answers).
pub const RECHECK_AFTER_MS: u64 = 60_000;
/// An upstream lookup that takes longer counts as an outage.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub user_id: String,
    pub name: Option<String>,
    pub email: Option<String>,
    pub expires_at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedSession {
    pub session: SessionInfo,
    pub checked_at_ms: u64,
}

impl Record for CachedSession {
    const KIND: &'static str = "session";
    const VERSION: u8 = 1;
}

#[derive(Debug, thiserror::Error)]
#[error("session store unavailable: {0}")]
pub struct SourceError(pub String);

/// Where sessions and project owners come from (Postgres in production).
#[async_trait]
pub trait SessionSource: Send + Sync {
    async fn lookup(&self, token: &str) -> Result<Option<SessionInfo>, SourceError>;
    async fn project_owner(&self, project_id: &str) -> Result<Option<String>, SourceError>;
}

pub use crate::config::{AuthTables, is_sql_identifier};

pub struct PostgresSource {
    url: String,
    tables: AuthTables,
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    /// How the session and user tables look, read from `information_schema` once.
    shape: tokio::sync::OnceCell<Shape>,
}

/// The session and user tables as this database names them: Better Auth's stock schema
/// (`session`/`user`, camelCase `userId`, `expiresAt`) or the original Weldr one (`sessions`/
/// `users`, snake_case).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub sessions: String,
    pub users: String,
    pub user_id: String,
    pub expires_at: String,
}

impl Shape {
    fn configured(tables: &AuthTables) -> Self {
        Self {
            sessions: tables.sessions.clone(),
            users: tables.users.clone(),
            user_id: "user_id".into(),
            expires_at: "expires_at".into(),
        }
    }
}

/// `schema.table` or `table` → (schema, table).
fn split_table(name: &str) -> (Option<&str>, &str) {
    match name.split_once('.') {
        Some((schema, table)) => (Some(schema), table),
        None => (None, name),
    }
}

impl PostgresSource {
    pub fn new(url: String, tables: AuthTables) -> Self {
        Self {
            url,
            tables,
            client: tokio::sync::Mutex::new(None),
            shape: tokio::sync::OnceCell::new(),
        }
    }

    /// The tables' shape: the configured (original) names when the sessions table has
    /// `user_id`; else Better Auth's stock `session`/`user` with camelCase columns when they
    /// exist in the same schema; else the configured names (whose queries then say what is
    /// missing).
    async fn shape(&self) -> Result<Shape, SourceError> {
        if let Some(shape) = self.shape.get() {
            return Ok(shape.clone());
        }
        let (schema, table) = split_table(&self.tables.sessions);
        let sql = "SELECT table_name::text, column_name::text FROM information_schema.columns \
                   WHERE table_name::text IN ($1::text, 'session') \
                   AND (CASE WHEN $2::text = '' THEN table_schema::text = ANY (current_schemas(false)::text[]) \
                        ELSE table_schema::text = $2::text END)";
        let rows = self
            .query_with(sql, &[&table, &schema.unwrap_or("")])
            .await?;
        let has = |t: &str, c: &str| {
            rows.iter()
                .any(|r| r.get::<_, String>(0) == t && r.get::<_, String>(1) == c)
        };
        let shape = if has(table, "user_id") {
            Shape::configured(&self.tables)
        } else if has("session", "userId") {
            let q = |t: &str| match schema {
                Some(s) => format!("{s}.\"{t}\""),
                None => format!("\"{t}\""),
            };
            tracing::info!(
                "Better Auth tables: the stock schema (session, user; camelCase columns)"
            );
            Shape {
                sessions: q("session"),
                users: q("user"),
                user_id: "\"userId\"".into(),
                expires_at: "\"expiresAt\"".into(),
            }
        } else {
            Shape::configured(&self.tables)
        };
        let _ = self.shape.set(shape.clone());
        Ok(shape)
    }

    async fn query(&self, sql: &str, arg: &str) -> Result<Vec<tokio_postgres::Row>, SourceError> {
        self.query_with(sql, &[&arg]).await
    }

    async fn query_with(
        &self,
        sql: &str,
        args: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, SourceError> {
        let work = async {
            let mut guard = self.client.lock().await;
            if guard.as_ref().is_none_or(|c| c.is_closed()) {
                let client = crate::pgconn::connect(&self.url)
                    .await
                    .map_err(|e| SourceError(e.to_string()))?;
                *guard = Some(client);
            }
            let client = guard
                .as_ref()
                .ok_or_else(|| SourceError("no connection".into()))?;
            match client.query(sql, args).await {
                Ok(rows) => Ok(rows),
                Err(e) => {
                    *guard = None;
                    Err(SourceError(e.to_string()))
                }
            }
        };
        tokio::time::timeout(UPSTREAM_TIMEOUT, work)
            .await
            .map_err(|_| SourceError("timed out".into()))?
    }
}

#[async_trait]
impl SessionSource for PostgresSource {
    async fn lookup(&self, token: &str) -> Result<Option<SessionInfo>, SourceError> {
        let t = self.shape().await?;
        let sql = format!(
            "SELECT s.{uid}::text, (EXTRACT(EPOCH FROM s.{exp}) * 1000)::float8, u.name::text, u.email::text \
             FROM {} s JOIN {} u ON u.id = s.{uid} WHERE s.token = $1",
            t.sessions,
            t.users,
            uid = t.user_id,
            exp = t.expires_at,
        );
        let rows = self.query(&sql, token).await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let expires: f64 = row.try_get(1).map_err(|e| SourceError(e.to_string()))?;
        Ok(Some(SessionInfo {
            user_id: row.try_get(0).map_err(|e| SourceError(e.to_string()))?,
            expires_at_ms: if expires.is_finite() && expires > 0.0 {
                expires as u64
            } else {
                0
            },
            name: row.try_get(2).ok(),
            email: row.try_get(3).ok(),
        }))
    }

    async fn project_owner(&self, project_id: &str) -> Result<Option<String>, SourceError> {
        let sql = format!(
            "SELECT user_id::text FROM {} WHERE id = $1",
            self.tables.projects
        );
        let rows = self.query(&sql, project_id).await?;
        Ok(rows.first().and_then(|r| r.try_get(0).ok()))
    }
}

fn cache_key(token: &str) -> String {
    super::tokens::hash_token(token)
}

pub fn cached(store: &Store, token: &str) -> Result<Option<CachedSession>, StorageError> {
    let rtx = store.begin_read()?;
    let t = rtx.open_table(SESSIONS)?;
    t.get(cache_key(token).as_str())?
        .map(|v| decode(v.value()))
        .transpose()
}

pub async fn remember(
    store: &Store,
    token: &str,
    session: SessionInfo,
) -> Result<(), StorageError> {
    let key = cache_key(token);
    let record = CachedSession {
        session,
        checked_at_ms: now_ms(),
    };
    store
        .writer()
        .write(move |ctx| {
            let mut t = ctx.table(SESSIONS)?;
            t.insert(key.as_str(), encode(&record).as_slice())?;
            Ok(())
        })
        .await
}

pub async fn forget(store: &Store, token: &str) -> Result<(), StorageError> {
    let key = cache_key(token);
    store
        .writer()
        .write(move |ctx| {
            let mut t = ctx.table(SESSIONS)?;
            t.remove(key.as_str())?;
            Ok(())
        })
        .await
}
