//! Authentication and access control.
//!
//! Every route except `/health`, `/openapi.json` and `/reference` needs a [`Principal`]:
//! a Better Auth session (cookie or bearer, looked up in Postgres and cached in redb) or a
//! local API token (the machine's operator, who may use every project on it). A project belongs
//! to the user who registered it (in cloud mode: `projects.user_id` of `PROJECT_ID` upstream);
//! someone else's project answers 404, exactly as a missing one does.

pub mod browser;
pub mod cookie;
pub mod limits;
pub mod sessions;
pub mod tokens;

use std::sync::Arc;

use http::HeaderMap;
use weldr_storage::model::{self, BranchRecord, ProjectRecord};
use weldr_storage::writer::now_ms;
use weldr_storage::{StorageError, Store};

use crate::branches::layout::BranchKey;
use crate::config::{Config, Mode};
use cookie::Bearer;
use sessions::{SessionInfo, SessionSource};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: String,
    pub kind: PrincipalKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    /// A local API token: the machine's operator.
    Operator,
    /// A Better Auth user session.
    User,
}

impl Principal {
    pub fn operator() -> Self {
        Self {
            user_id: "local".into(),
            kind: PrincipalKind::Operator,
        }
    }
    pub fn is_operator(&self) -> bool {
        self.kind == PrincipalKind::Operator
    }
    /// The owner recorded on projects this principal registers.
    pub fn owner(&self) -> Option<String> {
        (!self.is_operator()).then(|| self.user_id.clone())
    }
}

/// The credential a request was authenticated with. A stream keeps it to end when the
/// credential stops holding ([`Authenticator::still_valid`]): a revoked local token, an expired
/// or revoked session.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A local API token.
    Local(String),
    /// A Better Auth session token and when the session expires.
    Session { token: String, expires_at_ms: u64 },
    /// A browser session (a local token exchanged for the `weldr_session` cookie).
    Browser { value: String, expires_at_ms: u64 },
    /// A stream ticket, used up by opening the stream it names.
    Ticket,
}

impl Credential {
    /// Sent by the browser by itself (a cookie): state-changing requests need a same-origin
    /// `Origin` (CSRF).
    pub fn is_cookie(&self) -> bool {
        matches!(self, Credential::Browser { .. })
    }
}

/// Why a request may not go on.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credential, or one that does not hold (401).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The session store or the upstream cannot tell now; retry shortly (503).
    #[error("{0}")]
    Unavailable(&'static str),
    /// Missing, or someone else's (the same answer: no existence leak).
    #[error("project {0} not found")]
    ProjectNotFound(String),
    #[error("branch {} not found in project {}", .0.branch_id, .0.project_id)]
    BranchNotFound(BranchKey),
    #[error("at most {max} open streams per user; close one first")]
    TooManyStreams { max: usize },
    #[error("too many requests; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

fn unauthorized(message: &'static str) -> AuthError {
    AuthError::Unauthorized(message)
}

/// Authenticates requests.
pub struct Authenticator {
    pub cookie_prefix: String,
    pub secret: Option<Vec<u8>>,
    pub source: Option<Arc<dyn SessionSource>>,
    /// Outstanding stream tickets (cross-origin pages).
    pub tickets: browser::StreamTickets,
}

impl Authenticator {
    /// Who sent a request with these headers, and the credential that was accepted.
    pub async fn authenticate(
        &self,
        store: &Store,
        headers: &HeaderMap,
    ) -> Result<(Principal, Credential), AuthError> {
        if let Some(header) = headers.get("authorization") {
            let header = header
                .to_str()
                .map_err(|_| unauthorized("malformed Authorization header"))?;
            return match cookie::parse_bearer(header, self.secret.as_deref()) {
                Some(Bearer::Local(token)) => {
                    let t = token.clone();
                    match store.read(move |s| tokens::verify(s, &t)).await? {
                        Some(_) => Ok((Principal::operator(), Credential::Local(token))),
                        None => Err(unauthorized("unknown or revoked API token")),
                    }
                }
                Some(Bearer::Session(token)) => self.session(store, &token).await,
                None => Err(unauthorized("malformed or badly signed bearer token")),
            };
        }
        let cookies = cookie::cookie_header(headers);
        if let Some(value) = browser::cookie_value(&cookies) {
            let v = value.to_string();
            match store.read(move |s| browser::lookup(s, &v)).await? {
                Some(session) => {
                    return Ok((
                        Principal::operator(),
                        Credential::Browser {
                            value: value.to_string(),
                            expires_at_ms: session.expires_at_ms,
                        },
                    ));
                }
                None if cookie::find_session_cookie(&cookies, &self.cookie_prefix).is_none() => {
                    return Err(unauthorized(
                        "the browser session expired or was ended; sign in again",
                    ));
                }
                None => {}
            }
        }
        if cookie::find_session_cookie(&cookies, &self.cookie_prefix).is_some() {
            let secret = self.secret.as_deref().ok_or_else(|| {
                unauthorized(
                    "session cookies are not accepted here (BETTER_AUTH_SECRET is not set)",
                )
            })?;
            let token = cookie::session_token_from_cookie(&cookies, &self.cookie_prefix, secret)
                .ok_or_else(|| unauthorized("badly signed session cookie"))?;
            return self.session(store, &token).await;
        }
        Err(unauthorized(
            "sign in, or send Authorization: Bearer <token>",
        ))
    }

    /// Whether `credential` still holds now. A session's expiry is brought up to date (Better
    /// Auth extends sessions). While the upstream or the store cannot tell, it holds: an outage
    /// does not end streams.
    pub async fn still_valid(&self, store: &Store, credential: &mut Credential) -> bool {
        match credential {
            Credential::Browser {
                value,
                expires_at_ms,
            } => {
                if now_ms() >= *expires_at_ms {
                    return false;
                }
                let value = value.clone();
                !matches!(
                    store.read(move |s| browser::lookup(s, &value)).await,
                    Ok(None)
                )
            }
            // A ticket opened one stream; it holds for that stream's life.
            Credential::Ticket => true,
            Credential::Local(token) => {
                let token = token.clone();
                !matches!(
                    store.read(move |s| tokens::verify(s, &token)).await,
                    Ok(None)
                )
            }
            Credential::Session {
                token,
                expires_at_ms,
            } => {
                if now_ms() >= *expires_at_ms {
                    return false;
                }
                match self.session(store, token).await {
                    Ok((
                        _,
                        Credential::Session {
                            expires_at_ms: e, ..
                        },
                    )) => {
                        *expires_at_ms = e;
                        true
                    }
                    Ok(_) => true,
                    Err(e) => !matches!(e, AuthError::Unauthorized(_)),
                }
            }
        }
    }

    async fn session(
        &self,
        store: &Store,
        token: &str,
    ) -> Result<(Principal, Credential), AuthError> {
        let now = now_ms();
        let t = token.to_string();
        let cached = store.read(move |s| sessions::cached(s, &t)).await?;
        let live_cache = cached.as_ref().filter(|c| c.session.expires_at_ms > now);
        let principal = |s: &SessionInfo| {
            (
                Principal {
                    user_id: s.user_id.clone(),
                    kind: PrincipalKind::User,
                },
                Credential::Session {
                    token: token.to_string(),
                    expires_at_ms: s.expires_at_ms,
                },
            )
        };
        if let Some(c) = live_cache
            && (self.source.is_none()
                || now.saturating_sub(c.checked_at_ms) < sessions::RECHECK_AFTER_MS)
        {
            return Ok(principal(&c.session));
        }
        let Some(source) = &self.source else {
            return Err(unauthorized("unknown or expired session"));
        };
        match source.lookup(token).await {
            Ok(Some(session)) if session.expires_at_ms > now => {
                let p = principal(&session);
                if let Err(e) = sessions::remember(store, token, session).await {
                    tracing::warn!(error = %e, "could not cache a session");
                }
                Ok(p)
            }
            Ok(_) => {
                if cached.is_some() {
                    let _ = sessions::forget(store, token).await;
                }
                Err(unauthorized("unknown or expired session"))
            }
            Err(e) => match live_cache {
                Some(c) => {
                    tracing::warn!(error = %e, "session store unreachable; using the cached session");
                    Ok(principal(&c.session))
                }
                None => {
                    tracing::warn!(error = %e, "session store unreachable");
                    Err(AuthError::Unavailable(
                        "cannot verify the session right now; retry shortly",
                    ))
                }
            },
        }
    }

    /// The project, if `principal` may use it; 404 otherwise (no existence leak).
    pub async fn require_project(
        &self,
        store: &Store,
        config: &Config,
        principal: &Principal,
        project_id: &str,
    ) -> Result<ProjectRecord, AuthError> {
        let p = project_id.to_string();
        let project = store
            .read(move |s| model::get_project(&s.begin_read()?, &p))
            .await?;
        self.check_owner(store, config, principal, project_id, project)
            .await
    }

    /// `project` if it exists and `principal` may use it; 404 otherwise.
    async fn check_owner(
        &self,
        store: &Store,
        config: &Config,
        principal: &Principal,
        project_id: &str,
        project: Option<ProjectRecord>,
    ) -> Result<ProjectRecord, AuthError> {
        let not_found = || AuthError::ProjectNotFound(project_id.to_string());
        let project = project.ok_or_else(not_found)?;
        if principal.is_operator() {
            return Ok(project);
        }
        let owner = match &project.owner {
            Some(owner) => Some(owner.clone()),
            None if config.mode == Mode::Cloud => self.upstream_owner(store, &project).await?,
            None => None,
        };
        if owner.as_deref() == Some(principal.user_id.as_str()) {
            Ok(project)
        } else {
            Err(not_found())
        }
    }

    /// The project and branch, if `principal` may use them; 404 otherwise. Both are read in one
    /// transaction (one hop off the runtime: every stream connect comes through here).
    pub async fn require_branch(
        &self,
        store: &Store,
        config: &Config,
        principal: &Principal,
        key: &BranchKey,
    ) -> Result<BranchRecord, AuthError> {
        let (p, b) = (key.project_id.clone(), key.branch_id.clone());
        let (project, branch) = store
            .read(move |s| model::get_project_and_branch(&s.begin_read()?, &p, &b))
            .await?;
        self.check_owner(store, config, principal, &key.project_id, project)
            .await?;
        branch.ok_or_else(|| AuthError::BranchNotFound(key.clone()))
    }

    /// In cloud mode the machine's project belongs to `projects.user_id` upstream; remember it.
    async fn upstream_owner(
        &self,
        store: &Store,
        project: &ProjectRecord,
    ) -> Result<Option<String>, AuthError> {
        let Some(source) = &self.source else {
            return Ok(None);
        };
        let owner = source
            .project_owner(&project.project_id)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot read the project owner upstream");
                AuthError::Unavailable("cannot verify project access right now; retry shortly")
            })?;
        if let Some(owner) = &owner {
            let (p, o) = (project.project_id.clone(), owner.clone());
            let _ = store
                .writer()
                .write(move |ctx| model::set_project_owner(ctx, &p, &o))
                .await;
        }
        Ok(owner)
    }
}
