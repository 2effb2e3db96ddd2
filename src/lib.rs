//! weldr-agent: the machine an AI coding agent works in.
//!
//! The library holds everything; `main.rs` is only the CLI. See `DESIGN` in the README for the
//! architecture sketch.

pub mod api;
pub mod app;
pub mod auth;
pub mod background;
pub mod backup;
pub mod base;
pub mod branches;
pub mod config;
pub mod control;
pub mod evict;
pub mod excludes;
pub mod fsx;
pub mod git;
pub mod ids;
pub mod integrations;
pub mod llm;
pub mod mirror;
pub mod pgconn;
pub mod residency;
pub mod sandbox;
pub mod server;
pub mod stream;
pub mod sync;
pub mod tools;
pub mod worker;
pub mod workflow;

pub use app::App;
pub use branches::registry;
pub use config::Config;

/// Install ring as the process's one rustls crypto provider. Call before any TLS use (the
/// binary does it first thing in `main`; tests call it too). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
