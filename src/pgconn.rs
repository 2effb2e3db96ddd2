//! Connecting to Postgres as libpq does, TLS included: `sslmode` of the URL (`disable`,
//! `prefer` — the default —, `require`, `verify-ca`, `verify-full`) and `sslrootcert` (a PEM
//! file of CA certificates; else the system's roots). TLS is rustls with the process's one
//! crypto provider (ring).
//!
//! As in libpq: `require` encrypts without checking the certificate, `verify-ca` checks that
//! it chains to a trusted CA, `verify-full` also that it names the host; `prefer` tries TLS and
//! falls back to plain. A URL that asks for TLS which cannot be set up (an unreadable
//! `sslrootcert`, no roots at all) is an error that says so, never a silent plain connection.
//!
//! A leaf: it uses nothing else of the crate.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::SslMode as PgSslMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

#[derive(Debug, thiserror::Error)]
pub enum PgConnError {
    #[error("the Postgres URL is not valid: {0}")]
    Url(String),
    #[error("TLS to Postgres cannot be set up: {0}")]
    Tls(String),
    #[error("{}", explain(.0))]
    Connect(#[from] tokio_postgres::Error),
}

/// A Postgres error with its causes (tokio-postgres' own text is only "db error" or "error
/// performing TLS handshake"): the server's code and message, or each source in turn.
pub fn explain(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.code().code(), db.message());
    }
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// A URL without the parameters tokio-postgres does not know (`sslmode` values beyond its
/// three, `sslrootcert`), and what they said.
fn split_url(url: &str) -> Result<(String, SslMode, Option<String>), PgConnError> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut mode = SslMode::Prefer;
    let mut root = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(v)
            .decode_utf8()
            .map_err(|_| PgConnError::Url(format!("{k} is not UTF-8")))?
            .into_owned();
        match k {
            "sslmode" => {
                mode = match v.as_str() {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => {
                        return Err(PgConnError::Url(format!(
                            "sslmode={other}: expected disable, prefer, require, verify-ca or verify-full"
                        )));
                    }
                }
            }
            "sslrootcert" => root = Some(v),
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, mode, root))
}

/// The `sslmode` a URL asks for (prefer when it says none).
pub fn ssl_mode(url: &str) -> Result<SslMode, PgConnError> {
    Ok(split_url(url)?.1)
}

/// Check `url` without connecting: its parameters parse, and the TLS it asks for can be set
/// up (an `sslrootcert` that reads, roots to verify with). The server checks `DATABASE_URL`
/// at start, so a misconfiguration is a startup error rather than a 503 on every login.
pub fn check(url: &str) -> Result<SslMode, PgConnError> {
    let (plain_url, mode, root) = split_url(url)?;
    let _: tokio_postgres::Config = plain_url
        .parse()
        .map_err(|e: tokio_postgres::Error| PgConnError::Url(e.to_string()))?;
    if mode != SslMode::Disable {
        client_config(mode, root.as_deref())?;
    }
    Ok(mode)
}

/// Connect to `url`; the connection's task is spawned (it ends with the client).
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, PgConnError> {
    let (plain_url, mode, root) = split_url(url)?;
    let mut config: tokio_postgres::Config = plain_url
        .parse()
        .map_err(|e: tokio_postgres::Error| PgConnError::Url(e.to_string()))?;
    if mode == SslMode::Disable {
        config.ssl_mode(PgSslMode::Disable);
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        spawn(connection);
        return Ok(client);
    }
    config.ssl_mode(match mode {
        SslMode::Prefer => PgSslMode::Prefer,
        _ => PgSslMode::Require,
    });
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_config(mode, root.as_deref())?);
    let (client, connection) = config.connect(tls).await?;
    spawn(connection);
    Ok(client)
}

fn spawn<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
}

/// The rustls configuration of `mode`: the roots of `sslrootcert` or the system's, and a
/// verifier that checks as much as the mode asks.
fn client_config(mode: SslMode, root: Option<&str>) -> Result<rustls::ClientConfig, PgConnError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| PgConnError::Tls(e.to_string()))?;
    if matches!(mode, SslMode::Prefer | SslMode::Require) && root.is_none() {
        // libpq: encrypted, the certificate not checked (there is no CA to check it against).
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unchecked(provider)))
            .with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    match root {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| PgConnError::Tls(format!("sslrootcert {path}: {e}")))?;
            let mut found = 0;
            for cert in rustls_pki_certs(&pem) {
                let cert =
                    cert.map_err(|e| PgConnError::Tls(format!("sslrootcert {path}: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| PgConnError::Tls(format!("sslrootcert {path}: {e}")))?;
                found += 1;
            }
            if found == 0 {
                return Err(PgConnError::Tls(format!(
                    "sslrootcert {path} holds no PEM certificate"
                )));
            }
        }
        None => {
            let loaded = rustls_native_certs::load_native_certs();
            for cert in loaded.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(PgConnError::Tls(
                    "no CA certificates in the system store (install ca-certificates or give sslrootcert)"
                        .into(),
                ));
            }
        }
    }
    let webpki =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| PgConnError::Tls(e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = if mode == SslMode::VerifyFull {
        webpki
    } else {
        // verify-ca (and require/prefer with a root file, as libpq): the chain, not the name.
        Arc::new(ChainOnly(webpki))
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

fn rustls_pki_certs(
    pem: &[u8],
) -> impl Iterator<Item = Result<CertificateDer<'static>, rustls::pki_types::pem::Error>> + '_ {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
}

/// Accepts any certificate (the handshake's signatures are still checked): `require`.
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The chain must verify; the name need not match: `verify-ca`.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_the_url() {
        let (url, mode, root) = split_url(
            "postgres://u@h:5432/db?sslmode=verify-full&application_name=w&sslrootcert=%2Fca.pem",
        )
        .unwrap();
        assert_eq!(url, "postgres://u@h:5432/db?application_name=w");
        assert_eq!(mode, SslMode::VerifyFull);
        assert_eq!(root.as_deref(), Some("/ca.pem"));
        assert_eq!(split_url("postgres://h/db").unwrap().1, SslMode::Prefer);
        assert!(split_url("postgres://h/db?sslmode=sometimes").is_err());
    }
}
