//! TLS to Postgres as libpq does it, against a private server with `ssl = on`, a certificate
//! from a test CA for the name `db.internal`, and only `hostssl` connections allowed.

#[path = "common/pg.rs"]
mod pg;

use weldr_agent::pgconn;

fn url(port: u16, params: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/postgres?{params}")
}

async fn select_one(url: &str) -> Result<i32, String> {
    let client = pgconn::connect(url).await.map_err(|e| format!("{e:?}"))?;
    let row = client
        .query_one("SELECT 1", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sslmode_against_a_server_that_only_speaks_tls() {
    weldr_agent::install_crypto_provider();
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pg::make_certs(certs.path(), "db.internal");
    let other = tempfile::tempdir().unwrap();
    let (other_ca, _, _) = pg::make_certs(other.path(), "db.internal");
    let server = pg::PrivatePg::start(Some(pg::ServerTls {
        cert: &cert,
        key: &key,
        only_tls: true,
    }));
    let port = server.port;
    let ca = ca.display().to_string();

    // Plain is refused by the server: TLS is really in use below.
    let err = select_one(&url(port, "sslmode=disable")).await.unwrap_err();
    assert!(
        err.contains("no encryption") || err.contains("pg_hba"),
        "{err}"
    );
    // require (and prefer): encrypted, the certificate not checked.
    assert_eq!(select_one(&url(port, "sslmode=require")).await, Ok(1));
    assert_eq!(select_one(&url(port, "")).await, Ok(1));
    // verify-ca: the chain to the given CA; the name is not checked.
    assert_eq!(
        select_one(&url(port, &format!("sslmode=verify-ca&sslrootcert={ca}"))).await,
        Ok(1)
    );
    // verify-full: the certificate names db.internal, not 127.0.0.1.
    let err = select_one(&url(port, &format!("sslmode=verify-full&sslrootcert={ca}")))
        .await
        .unwrap_err();
    assert!(err.contains("NotValidForName"), "{err}");
    // Another CA (of the same name): refused, saying why.
    let err = select_one(&url(
        port,
        &format!("sslmode=verify-ca&sslrootcert={}", other_ca.display()),
    ))
    .await
    .unwrap_err();
    assert!(err.contains("InvalidCertificate"), "{err}");
    // verify-full passes when the name matches (hostaddr keeps the address, host the name).
    let full = format!(
        "postgres://postgres@db.internal:{port}/postgres?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={ca}"
    );
    assert_eq!(select_one(&full).await, Ok(1));
}

#[test]
fn tls_that_cannot_be_set_up_is_an_error_before_any_connection() {
    weldr_agent::install_crypto_provider();
    let err = pgconn::check("postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
        .unwrap_err()
        .to_string();
    assert!(err.contains("sslrootcert /nonexistent/ca.pem"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let err = pgconn::check(&format!(
        "postgres://h/db?sslmode=verify-ca&sslrootcert={}",
        empty.display()
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("no PEM certificate"), "{err}");
    assert!(pgconn::check("postgres://h/db?sslmode=maybe").is_err());
    assert_eq!(
        pgconn::check("postgres://h/db?sslmode=require").unwrap(),
        pgconn::SslMode::Require
    );
}
