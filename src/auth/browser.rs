//! Browsers as clients: a local API token exchanged for an HttpOnly cookie session, and
//! short-lived single-use stream tickets for pages on another origin.
//!
//! A browser session is `ws_` + 32 random bytes (base64url) in the `weldr_session` cookie;
//! only its SHA-256 is stored (redb `browser_sessions`), with the hash of the token it was
//! exchanged for and an expiry. It holds while both hold: revoking the token ends its
//! sessions. A stream ticket lives in memory for [`TICKET_TTL_MS`], names one branch, and is
//! gone once used (a restart forgets them: the page asks for a new one).

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use weldr_storage::record::{Record, decode, encode};
use weldr_storage::tables::{BROWSER_SESSIONS, TOKENS};
use weldr_storage::writer::now_ms;
use weldr_storage::{StorageError, Store};

use super::Principal;
use super::tokens::hash_token;
use crate::branches::layout::BranchKey;

/// The cookie's name.
pub const COOKIE: &str = "weldr_session";
/// How long a browser session lasts.
pub const SESSION_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// How long a stream ticket may wait to be used.
pub const TICKET_TTL_MS: u64 = 60 * 1000;
/// Most unused tickets kept (older ones are dropped first).
const MAX_TICKETS: usize = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrowserSession {
    /// The hash of the local token it was exchanged for.
    pub token_hash: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
}

impl Record for BrowserSession {
    const KIND: &'static str = "browser_session";
    const VERSION: u8 = 1;
}

fn random(prefix: &str) -> Result<String, StorageError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| StorageError::Database(format!("no randomness: {e}")))?;
    Ok(format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// Exchange a live local `token` for a session: its cookie value and expiry; None when the
/// token is not a live one.
pub async fn open(store: &Store, token: &str) -> Result<Option<(String, u64)>, StorageError> {
    let token_hash = hash_token(token);
    let value = random("ws_")?;
    let key = hash_token(&value);
    let now = now_ms();
    let session = BrowserSession {
        token_hash,
        created_at_ms: now,
        expires_at_ms: now + SESSION_TTL_MS,
    };
    let expires = session.expires_at_ms;
    let opened = store
        .writer()
        .write(move |ctx| {
            if ctx
                .table(TOKENS)?
                .get(session.token_hash.as_str())?
                .is_none()
            {
                return Ok(false);
            }
            let mut t = ctx.table(BROWSER_SESSIONS)?;
            // Expired sessions go when new ones come (bounded without a sweeper).
            let mut stale = Vec::new();
            for entry in t.iter()? {
                let (k, v) = entry?;
                if decode::<BrowserSession>(v.value()).map_or(true, |s| s.expires_at_ms <= now) {
                    stale.push(k.value().to_string());
                }
            }
            for k in stale {
                t.remove(k.as_str())?;
            }
            t.insert(key.as_str(), encode(&session).as_slice())?;
            Ok(true)
        })
        .await?;
    Ok(opened.then_some((value, expires)))
}

/// The session a cookie value names, while it and its token hold (a blocking redb read).
pub fn lookup(store: &Store, value: &str) -> Result<Option<BrowserSession>, StorageError> {
    let rtx = store.begin_read()?;
    let t = rtx.open_table(BROWSER_SESSIONS)?;
    let Some(session) = t
        .get(hash_token(value).as_str())?
        .map(|v| decode::<BrowserSession>(v.value()))
        .transpose()?
    else {
        return Ok(None);
    };
    if session.expires_at_ms <= now_ms() {
        return Ok(None);
    }
    let tokens = rtx.open_table(TOKENS)?;
    Ok(tokens
        .get(session.token_hash.as_str())?
        .is_some()
        .then_some(session))
}

/// End the session a cookie value names (nothing when there is none).
pub async fn close(store: &Store, value: &str) -> Result<(), StorageError> {
    let key = hash_token(value);
    store
        .writer()
        .write(move |ctx| {
            ctx.table(BROWSER_SESSIONS)?.remove(key.as_str())?;
            Ok(())
        })
        .await
}

/// The `weldr_session` cookie's value in a `Cookie` header, if any.
pub fn cookie_value(cookie_header: &str) -> Option<&str> {
    cookie_header.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        (name == COOKIE && !value.is_empty()).then_some(value)
    })
}

struct Ticket {
    principal: Principal,
    branch: BranchKey,
    expires_at_ms: u64,
}

/// Outstanding stream tickets (by hash).
#[derive(Default)]
pub struct StreamTickets {
    tickets: Mutex<HashMap<String, Ticket>>,
}

impl StreamTickets {
    /// A ticket for `principal` to open `branch`'s stream once, and when it expires.
    pub fn issue(
        &self,
        principal: Principal,
        branch: BranchKey,
    ) -> Result<(String, u64), StorageError> {
        let ticket = random("wt_")?;
        let now = now_ms();
        let expires_at_ms = now + TICKET_TTL_MS;
        let mut map = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, t| t.expires_at_ms > now);
        if map.len() >= MAX_TICKETS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, t)| t.expires_at_ms)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(
            hash_token(&ticket),
            Ticket {
                principal,
                branch,
                expires_at_ms,
            },
        );
        Ok((ticket, expires_at_ms))
    }

    /// Use `ticket` for `branch`'s stream: the principal it was issued to. A ticket is gone
    /// after its first use, whatever the branch; an expired one or one for another branch is
    /// refused.
    pub fn redeem(&self, ticket: &str, branch: &BranchKey) -> Option<Principal> {
        let t = self
            .tickets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&hash_token(ticket))?;
        (t.expires_at_ms > now_ms() && &t.branch == branch).then_some(t.principal)
    }
}
