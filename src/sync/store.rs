//! Where a branch's snapshots live: S3 (bucket per branch, or one shared `S3_BUCKET` with
//! `{projectId}/{branchId}/` prefixes) or, in local mode without S3 credentials, an fs-backed
//! store under `WELDR_OBJECT_STORE_DIR`. Both go through opendal.

use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opendal::{ErrorKind, Operator};
use sha2::{Digest, Sha256};

use super::SyncError;
use crate::config::{Config, Mode};

/// An opened object store for one branch, with a count of the requests made through it.
pub struct Store {
    op: Operator,
    /// The original scripts' `BUCKET_NAME`: the per-branch bucket, the shared bucket, or (fs)
    /// the per-branch directory name under the object store dir.
    pub bucket: String,
    /// S3 details needed to create the bucket; None for fs or a shared bucket.
    create: Option<BucketCreate>,
    requests: AtomicU64,
}

struct BucketCreate {
    endpoint: String,
    region: String,
    /// AWS SigV4 for the `PUT /{bucket}` (reqsign, the signer opendal's S3 service uses).
    signer: reqsign_core::Signer<reqsign_aws_v4::Credential>,
}

/// `project-{projectId}-branch-{branchId}`, the original's bucket name.
pub fn bucket_name(project_id: &str, branch_id: &str) -> String {
    format!("project-{project_id}-branch-{branch_id}")
}

fn install_http_transport() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // rustls without a compiled-in provider: it uses the process default (ring), which the
        // binary installs first thing; tests call `install_crypto_provider` too.
        crate::install_crypto_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .build()
            .unwrap_or_default();
        opendal::HttpTransporter::install_default(
            opendal_http_transport_reqwest::ReqwestTransport::new(client),
        );
    });
}

impl Store {
    /// Open the store of one branch (no request is made).
    pub fn open(config: &Config, project_id: &str, branch_id: &str) -> Result<Self, SyncError> {
        let bucket = bucket_name(project_id, branch_id);
        Self::open_at(
            config,
            &bucket,
            &bucket,
            &format!("/{project_id}/{branch_id}/"),
        )
    }

    /// Open where the store's own backup goes (see `crate::backup`): `weldr-store` under the
    /// fs store, `.weldr-store/` in the shared bucket (no branch id starts with a dot, so
    /// discovery never takes it for a project), or its own bucket.
    pub fn open_store_backup(config: &Config) -> Result<Self, SyncError> {
        Self::open_at(
            config,
            "weldr-store",
            &config.store_backup.bucket,
            "/.weldr-store/",
        )
    }

    /// Open a place: the directory `fs_dir` under the fs store, the bucket `own_bucket` when
    /// every place has a bucket, or `shared_root` in `S3_BUCKET`.
    fn open_at(
        config: &Config,
        fs_dir: &str,
        own_bucket: &str,
        shared_root: &str,
    ) -> Result<Self, SyncError> {
        let s3 = &config.s3;
        let creds = match (&s3.access_key_id, &s3.secret_access_key) {
            (Some(k), Some(s)) => Some((k.expose().to_string(), s.expose().to_string())),
            _ => None,
        };
        let Some((key, secret)) = creds else {
            if config.mode == Mode::Cloud {
                return Err(SyncError::Config(
                    "cloud mode needs S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY".into(),
                ));
            }
            let bucket = fs_dir.to_string();
            let root = config.object_store_dir.join(&bucket);
            // Writes go to a temp file and are renamed into place: a crash never leaves a
            // truncated `latest` or manifest.
            let tmp = config.object_store_dir.join(".tmp");
            let builder = opendal::services::Fs::default()
                .root(&root.to_string_lossy())
                .atomic_write_dir(&tmp.to_string_lossy());
            let op = Operator::new(builder)
                .map_err(|e| SyncError::store("open the fs object store", e))?;
            return Ok(Self {
                op,
                bucket,
                create: None,
                requests: AtomicU64::new(0),
            });
        };
        install_http_transport();
        let (bucket, root, create) = match &s3.bucket {
            Some(shared) => (shared.clone(), shared_root.to_string(), None),
            None => {
                let bucket = own_bucket.to_string();
                check_bucket_name(&bucket)?;
                let create = BucketCreate {
                    endpoint: s3.endpoint.trim_end_matches('/').to_string(),
                    region: s3.region.clone(),
                    signer: bucket_signer(&s3.region, &key, &secret),
                };
                (bucket, "/".to_string(), Some(create))
            }
        };
        let op = s3_operator(config, &bucket, &root, &key, &secret)?
            .layer(opendal::layers::RetryLayer::new().with_max_times(3));
        Ok(Self {
            op,
            bucket,
            create,
            requests: AtomicU64::new(0),
        })
    }

    /// The opendal operator (tests and tools; requests made through it are not counted).
    pub fn operator(&self) -> &Operator {
        &self.op
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub(crate) fn count(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Read a whole object; None when it (or its bucket) does not exist.
    pub async fn get(&self, path: &str) -> Result<Option<Vec<u8>>, SyncError> {
        self.count();
        match self.op.read(path).await {
            Ok(buf) => Ok(Some(buf.to_vec())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            // opendal reports a missing bucket as a configuration error.
            Err(e) if e.to_string().contains("NoSuchBucket") => Ok(None),
            Err(e) => Err(SyncError::store(&format!("read {path}"), e)),
        }
    }

    /// [`Self::get`] of at most `max` bytes: a bigger object is an error (streamed, so it
    /// never fills memory), as a bucket someone tampered with could hold anything.
    pub async fn get_capped(&self, path: &str, max: u64) -> Result<Option<Vec<u8>>, SyncError> {
        use futures_util::StreamExt;
        self.count();
        let missing = |e: &opendal::Error| {
            e.kind() == ErrorKind::NotFound || e.to_string().contains("NoSuchBucket")
        };
        let reader = match self.op.reader(path).await {
            Ok(r) => r,
            Err(e) if missing(&e) => return Ok(None),
            Err(e) => return Err(SyncError::store(&format!("read {path}"), e)),
        };
        let mut stream = match reader.into_bytes_stream(..).await {
            Ok(s) => s,
            Err(e) if missing(&e) => return Ok(None),
            Err(e) => return Err(SyncError::store(&format!("read {path}"), e)),
        };
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        || e.to_string().contains("NoSuchBucket") =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(SyncError::Store(format!("read {path}: {e}"))),
            };
            if (out.len() + chunk.len()) as u64 > max {
                return Err(SyncError::Corrupt(format!(
                    "{path} in bucket {} is bigger than {max} bytes, more than this agent ever \
                     writes; the bucket was changed by something else",
                    self.bucket
                )));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(Some(out))
    }

    pub async fn put(&self, path: &str, data: Vec<u8>) -> Result<(), SyncError> {
        self.count();
        self.op
            .write(path, data)
            .await
            .map(|_| ())
            .map_err(|e| SyncError::store(&format!("write {path}"), e))
    }

    /// Create the per-branch bucket when missing (S3 has no implicit buckets; opendal does not
    /// create them). A signed `PUT /{bucket}`: Tigris rejects unsigned requests.
    pub async fn ensure_bucket(&self) -> Result<(), SyncError> {
        let Some(c) = &self.create else {
            return Ok(());
        };
        self.count();
        let url = format!("{}/{}", c.endpoint, self.bucket);
        let parsed = reqwest::Url::parse(&url)
            .map_err(|e| SyncError::Config(format!("bad S3_ENDPOINT {:?}: {e}", c.endpoint)))?;
        if parsed.host_str().is_none() {
            return Err(SyncError::Config(format!(
                "bad S3_ENDPOINT {:?}",
                c.endpoint
            )));
        }
        // Tigris (region `auto`) and us-east-1 take an empty body; others (AWS, moto with a
        // region-specific signature) want the location constraint: retry with it when told.
        let plain = c.region == "auto" || c.region == "us-east-1";
        let first = if plain {
            Vec::new()
        } else {
            location_body(&c.region)
        };
        match self.put_bucket(&parsed, c, first).await {
            Err(SyncError::Store(msg)) if plain && msg.contains("IllegalLocationConstraint") => {
                self.count();
                self.put_bucket(&parsed, c, location_body(&c.region)).await
            }
            other => other,
        }
    }

    async fn put_bucket(
        &self,
        url: &reqwest::Url,
        c: &BucketCreate,
        body: Vec<u8>,
    ) -> Result<(), SyncError> {
        let headers = sign_put_bucket(&c.signer, url, &body).await?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| SyncError::Network(format!("create an HTTP client: {e}")))?;
        let resp = client
            .put(url.clone())
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                SyncError::Network(format!(
                    "create bucket {} at {}: {e}; check S3_ENDPOINT and the network",
                    self.bucket, c.endpoint
                ))
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        if status.as_u16() == 409 && text.contains("BucketAlreadyOwnedByYou") {
            return Ok(());
        }
        if status.as_u16() == 409 && text.contains("BucketAlreadyExists") {
            // Taken: ours on some providers (they answer so for the owner too); a foreign bucket
            // shows as AccessDenied on the first write.
            return Ok(());
        }
        Err(SyncError::Store(format!(
            "create bucket {}: HTTP {status}: {}; check the S3 credentials and that the bucket \
             name is free (or set S3_BUCKET to a shared bucket)",
            self.bucket,
            text.chars().take(300).collect::<String>()
        )))
    }
}

fn location_body(region: &str) -> Vec<u8> {
    format!(
        "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
         <LocationConstraint>{region}</LocationConstraint></CreateBucketConfiguration>"
    )
    .into_bytes()
}

/// S3 bucket names: 3-63 characters of a-z, 0-9, '-' (and '.').
fn check_bucket_name(name: &str) -> Result<(), SyncError> {
    let ok = (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(SyncError::Config(format!(
            "{name:?} is not a valid S3 bucket name (lowercase letters, digits and '-', at most \
             63 characters); set S3_BUCKET to use one shared bucket with prefixes instead"
        )))
    }
}

fn bucket_signer(
    region: &str,
    access_key_id: &str,
    secret_access_key: &str,
) -> reqsign_core::Signer<reqsign_aws_v4::Credential> {
    reqsign_core::Signer::new(
        // No environment, files or HTTP: the credentials are the configured ones only.
        reqsign_core::Context::new(),
        reqsign_aws_v4::StaticCredentialProvider::new(access_key_id, secret_access_key),
        reqsign_aws_v4::RequestSigner::new("s3", region),
    )
}

/// An opendal S3 operator for `bucket` under `root`, with the configured endpoint, region and
/// credentials only (no environment, files or instance metadata).
fn s3_operator(
    config: &Config,
    bucket: &str,
    root: &str,
    key: &str,
    secret: &str,
) -> Result<Operator, SyncError> {
    let builder = opendal::services::S3::default()
        .endpoint(&config.s3.endpoint)
        .region(&config.s3.region)
        .bucket(bucket)
        .root(root)
        .access_key_id(key)
        .secret_access_key(secret)
        .disable_config_load()
        .disable_ec2_metadata();
    Operator::new(builder).map_err(|e| SyncError::store("configure the S3 store", e))
}

/// The branches object storage holds snapshots of, as (projectId, branchId): from the bucket
/// names (`project-{projectId}-branch-{branchId}`, one bucket per branch), the shared
/// `S3_BUCKET`'s `{projectId}/{branchId}/` prefixes, or the fs store's directories. Names that
/// do not parse as two valid ids are skipped.
pub async fn discover(config: &Config) -> Result<Vec<(String, String)>, SyncError> {
    let s3 = &config.s3;
    let (Some(key), Some(secret)) = (&s3.access_key_id, &s3.secret_access_key) else {
        if config.mode == Mode::Cloud {
            return Err(SyncError::Config(
                "cloud mode needs S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY".into(),
            ));
        }
        return Ok(discover_fs(&config.object_store_dir));
    };
    install_http_transport();
    match &s3.bucket {
        Some(shared) => discover_shared(config, shared, key.expose(), secret.expose()).await,
        None => discover_buckets(config, key.expose(), secret.expose()).await,
    }
}

/// (projectId, branchId) of a per-branch bucket's name.
pub fn parse_bucket_name(name: &str) -> Option<(String, String)> {
    let (project, branch) = name.strip_prefix("project-")?.split_once("-branch-")?;
    let valid = |id: &str| crate::ids::check_id("id", id).is_ok();
    (valid(project) && valid(branch)).then(|| (project.to_string(), branch.to_string()))
}

fn discover_fs(dir: &std::path::Path) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, String)> = entries
        .flatten()
        .filter(|e| std::fs::symlink_metadata(e.path().join("latest")).is_ok_and(|m| m.is_file()))
        .filter_map(|e| parse_bucket_name(&e.file_name().to_string_lossy()))
        .collect();
    out.sort();
    out
}

/// ListBuckets (a signed `GET /`), the names that are branches'.
async fn discover_buckets(
    config: &Config,
    key: &str,
    secret: &str,
) -> Result<Vec<(String, String)>, SyncError> {
    let s3 = &config.s3;
    let endpoint = s3.endpoint.trim_end_matches('/');
    let url = reqwest::Url::parse(&format!("{endpoint}/"))
        .map_err(|e| SyncError::Config(format!("bad S3_ENDPOINT {endpoint:?}: {e}")))?;
    let signer = bucket_signer(&s3.region, key, secret);
    let headers = sign_request(&signer, http::Method::GET, &url, b"").await?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| SyncError::Network(format!("create an HTTP client: {e}")))?;
    let resp = client
        .get(url)
        .headers(headers)
        .send()
        .await
        .map_err(|e| SyncError::Network(format!("list buckets at {endpoint}: {e}")))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(SyncError::Store(format!(
            "list buckets: HTTP {status}: {}",
            text.chars().take(300).collect::<String>()
        )));
    }
    let mut out: Vec<(String, String)> = text
        .split("<Name>")
        .skip(1)
        .filter_map(|rest| rest.split_once("</Name>").map(|(name, _)| name))
        .filter_map(parse_bucket_name)
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// The shared bucket's `{projectId}/{branchId}/` prefixes.
async fn discover_shared(
    config: &Config,
    bucket: &str,
    key: &str,
    secret: &str,
) -> Result<Vec<(String, String)>, SyncError> {
    let op = s3_operator(config, bucket, "/", key, secret)?;
    let valid = |id: &str| crate::ids::check_id("id", id).is_ok();
    let mut out = Vec::new();
    let projects = op
        .list("/")
        .await
        .map_err(|e| SyncError::store("list the shared bucket", e))?;
    for p in projects.iter().filter(|e| e.metadata().is_dir()) {
        let project = p.path().trim_end_matches('/').to_string();
        if !valid(&project) {
            continue;
        }
        let branches = op
            .list(&format!("{project}/"))
            .await
            .map_err(|e| SyncError::store("list the shared bucket", e))?;
        for b in branches.iter().filter(|e| e.metadata().is_dir()) {
            let branch = b
                .path()
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string();
            if valid(&branch) {
                out.push((project.clone(), branch));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The headers of a SigV4-signed `PUT {url}` (path-style bucket creation) with `body`: `host`,
/// `x-amz-date`, `x-amz-content-sha256` (the body's hash: the payload is signed too) and
/// `authorization`.
async fn sign_put_bucket(
    signer: &reqsign_core::Signer<reqsign_aws_v4::Credential>,
    url: &reqwest::Url,
    body: &[u8],
) -> Result<http::HeaderMap, SyncError> {
    sign_request(signer, http::Method::PUT, url, body).await
}

/// The headers of a SigV4-signed request (`host`, `x-amz-date`, `x-amz-content-sha256`: the
/// payload is signed too, and `authorization`).
async fn sign_request(
    signer: &reqsign_core::Signer<reqsign_aws_v4::Credential>,
    method: http::Method,
    url: &reqwest::Url,
    body: &[u8],
) -> Result<http::HeaderMap, SyncError> {
    let failed = |e: &dyn std::fmt::Display| {
        SyncError::Config(format!(
            "sign a request to {url}: {e}; check S3_ENDPOINT and the S3 credentials"
        ))
    };
    let (mut parts, ()) = http::Request::builder()
        .method(method)
        .uri(url.as_str())
        .header("x-amz-content-sha256", hex::encode(Sha256::digest(body)))
        .body(())
        .map_err(|e| failed(&e))?
        .into_parts();
    signer
        .sign(&mut parts, None)
        .await
        .map_err(|e| failed(&e))?;
    Ok(parts.headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What S3 (and Tigris, which rejects unsigned requests) needs from the signed request;
    /// the signature itself is reqsign's, checked there against the AWS SDK's signer, and
    /// moto accepts the request in tests/sync.rs.
    #[tokio::test]
    async fn put_bucket_is_signed_with_sigv4_over_the_body() {
        let location = location_body("eu-west-1");
        for (url, region, body) in [
            ("http://127.0.0.1:9000/project-a-branch-b", "auto", &b""[..]),
            (
                "https://fly.storage.tigris.dev/project-p-branch-b",
                "auto",
                &b""[..],
            ),
            ("http://127.0.0.1:9000/b-x", "eu-west-1", &location[..]),
        ] {
            let signer = bucket_signer(
                region,
                "AKIDEXAMPLE",
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            );
            let url = reqwest::Url::parse(url).unwrap();
            let headers = sign_put_bucket(&signer, &url, body).await.unwrap();
            let get = |name: &str| headers.get(name).unwrap().to_str().unwrap().to_string();
            let host = match url.port() {
                Some(port) => format!("{}:{port}", url.host_str().unwrap()),
                None => url.host_str().unwrap().to_string(),
            };
            assert_eq!(get("host"), host);
            assert_eq!(
                get("x-amz-content-sha256"),
                hex::encode(Sha256::digest(body))
            );
            let amz_date = get("x-amz-date");
            assert_eq!(amz_date.len(), "20150830T123600Z".len(), "{amz_date}");
            let auth = get("authorization");
            let scope = format!(
                "Credential=AKIDEXAMPLE/{}/{region}/s3/aws4_request, ",
                &amz_date[..8]
            );
            assert!(
                auth.starts_with(&format!("AWS4-HMAC-SHA256 {scope}")),
                "{auth}"
            );
            assert!(
                auth.contains(" SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature="),
                "{auth}"
            );
            let signature = auth.rsplit("Signature=").next().unwrap();
            assert_eq!(signature.len(), 64, "{auth}");
            assert!(signature.bytes().all(|b| b.is_ascii_hexdigit()), "{auth}");
        }
    }

    #[test]
    fn bucket_names() {
        assert!(check_bucket_name(&bucket_name("p1", "b-2")).is_ok());
        assert!(check_bucket_name(&bucket_name("P_1", "b")).is_err());
    }
}
