//! Where a branch's snapshots live: S3 (bucket per branch, or one shared `S3_BUCKET` with
//! `{projectId}/{branchId}/` prefixes) or, in local mode without S3 credentials, an fs-backed
//! store under `WELDR_OBJECT_STORE_DIR`. Both go through opendal.

use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
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
    access_key_id: String,
    secret_access_key: String,
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
            let bucket = bucket_name(project_id, branch_id);
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
            Some(shared) => (shared.clone(), format!("/{project_id}/{branch_id}/"), None),
            None => {
                let bucket = bucket_name(project_id, branch_id);
                check_bucket_name(&bucket)?;
                let create = BucketCreate {
                    endpoint: s3.endpoint.trim_end_matches('/').to_string(),
                    region: s3.region.clone(),
                    access_key_id: key.clone(),
                    secret_access_key: secret.clone(),
                };
                (bucket, "/".to_string(), Some(create))
            }
        };
        let builder = opendal::services::S3::default()
            .endpoint(&s3.endpoint)
            .region(&s3.region)
            .bucket(&bucket)
            .root(&root)
            .access_key_id(&key)
            .secret_access_key(&secret)
            .disable_config_load()
            .disable_ec2_metadata();
        let op = Operator::new(builder)
            .map_err(|e| SyncError::store("configure the S3 store", e))?
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
        let host = match (parsed.host_str(), parsed.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => {
                return Err(SyncError::Config(format!(
                    "bad S3_ENDPOINT {:?}",
                    c.endpoint
                )));
            }
        };
        // Tigris (region `auto`) and us-east-1 take an empty body; others (AWS, moto with a
        // region-specific signature) want the location constraint: retry with it when told.
        let plain = c.region == "auto" || c.region == "us-east-1";
        let first = if plain {
            Vec::new()
        } else {
            location_body(&c.region)
        };
        match self.put_bucket(&parsed, &host, c, first).await {
            Err(SyncError::Store(msg)) if plain && msg.contains("IllegalLocationConstraint") => {
                self.count();
                self.put_bucket(&parsed, &host, c, location_body(&c.region))
                    .await
            }
            other => other,
        }
    }

    async fn put_bucket(
        &self,
        url: &reqwest::Url,
        host: &str,
        c: &BucketCreate,
        body: Vec<u8>,
    ) -> Result<(), SyncError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let headers = sign_put_bucket(
            url.path(),
            host,
            &c.region,
            &c.access_key_id,
            &c.secret_access_key,
            &body,
            now,
        );
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| SyncError::Network(format!("create an HTTP client: {e}")))?;
        let mut req = client.put(url.clone()).body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let resp = req.send().await.map_err(|e| {
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

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// AWS Signature Version 4 headers for `PUT {path}` (path-style bucket creation).
fn sign_put_bucket(
    path: &str,
    host: &str,
    region: &str,
    key_id: &str,
    secret: &str,
    body: &[u8],
    unix_secs: u64,
) -> Vec<(&'static str, String)> {
    let (date, amz_date) = amz_dates(unix_secs);
    let payload_hash = hex::encode(Sha256::digest(body));
    let canonical = format!(
        "PUT\n{path}\n\nhost:{host}\nx-amz-content-sha256:{payload_hash}\nx-amz-date:{amz_date}\n\n\
         host;x-amz-content-sha256;x-amz-date\n{payload_hash}"
    );
    let scope = format!("{date}/{region}/s3/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let mut key = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    for part in [region, "s3", "aws4_request"] {
        key = hmac(&key, part.as_bytes());
    }
    let signature = hex::encode(hmac(&key, to_sign.as_bytes()));
    vec![
        ("x-amz-date", amz_date),
        ("x-amz-content-sha256", payload_hash),
        (
            "authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential={key_id}/{scope}, \
                 SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={signature}"
            ),
        ),
    ]
}

/// (`YYYYMMDD`, `YYYYMMDDTHHMMSSZ`) in UTC.
fn amz_dates(unix_secs: u64) -> (String, String) {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let date = format!("{y:04}{m:02}{d:02}");
    let time = format!("{:02}{:02}{:02}", rem / 3600, (rem % 3600) / 60, rem % 60);
    (date.clone(), format!("{date}T{time}Z"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(amz_dates(0).1, "19700101T000000Z");
        assert_eq!(amz_dates(1_440_938_160).1, "20150830T123600Z");
        assert_eq!(amz_dates(951_782_400).0, "20000229");
    }

    #[test]
    fn sigv4_matches_the_aws_example_key_derivation() {
        // AWS documentation example: signing key for 20150830/us-east-1/iam.
        let mut key = hmac(b"AWS4wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", b"20150830");
        for part in ["us-east-1", "iam", "aws4_request"] {
            key = hmac(&key, part.as_bytes());
        }
        assert_eq!(
            hex::encode(key),
            "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"
        );
    }

    /// Reference signatures from botocore's `S3SigV4Auth` (the AWS SDK's signer) for the same
    /// request at 2015-08-30T12:36:00Z with the AWS documentation's example credentials.
    #[test]
    fn put_bucket_signature_matches_botocore() {
        let location = "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
                        <LocationConstraint>eu-west-1</LocationConstraint></CreateBucketConfiguration>";
        for (path, host, region, body, want) in [
            (
                "/project-a-branch-b",
                "127.0.0.1:9000",
                "auto",
                "",
                "58ee36da7dea0504eb10bbac308fdcae156de516e74c7f9e634561d69e0d8309",
            ),
            (
                "/project-p-branch-b",
                "fly.storage.tigris.dev",
                "auto",
                "",
                "af6c5b4071a265191e72aba0ac01e14891fed26c4cd9dd3a759b5ecb7fc42a04",
            ),
            (
                "/b-x",
                "127.0.0.1:9000",
                "eu-west-1",
                location,
                "75357c95fa0ea1f893f7e23455b38576df5a9f702f0a0eab3b494179a6a9f6f9",
            ),
        ] {
            let headers = sign_put_bucket(
                path,
                host,
                region,
                "AKIDEXAMPLE",
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                body.as_bytes(),
                1_440_938_160,
            );
            let auth = &headers
                .iter()
                .find(|(k, _)| *k == "authorization")
                .unwrap()
                .1;
            assert!(
                auth.ends_with(&format!("Signature={want}")),
                "{host}{path} {region}: {auth}"
            );
            assert!(auth.contains(&format!("Credential=AKIDEXAMPLE/20150830/{region}/s3/")));
        }
    }

    #[test]
    fn bucket_names() {
        assert!(check_bucket_name(&bucket_name("p1", "b-2")).is_ok());
        assert!(check_bucket_name(&bucket_name("P_1", "b")).is_err());
    }
}
