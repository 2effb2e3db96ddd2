//! What the HTTP providers share: one reqwest client, retries with backoff and jitter, the idle
//! timeout between chunks, error classification, and an incremental SSE parser.
//!
//! A provider builds the request body and a [`StreamParser`] per attempt; [`Transport::stream`]
//! sends, retries what may be retried (429, 5xx, connection errors, a stream that broke before
//! any delta reached the caller) and feeds the server-sent events to the parser.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::HeaderMap;
use serde_json::Value;

use super::{ChatResponse, Delta, DeltaSink, LlmError};

/// Retry policy: `attempts` tries in all, exponential backoff from `base_delay` (with jitter),
/// never waiting longer than `max_delay` (also the cap on a server's `retry-after`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: 4,
            base_delay: Duration::from_millis(500),
            // Also the cap on a delay the provider states (Gemini's free tier asks for up to
            // a minute).
            max_delay: Duration::from_secs(60),
        }
    }
}

impl Retry {
    /// The wait before attempt `attempt + 1` (`attempt` counts from 1), honouring `retry_after`.
    fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(after) = retry_after {
            return after.min(self.max_delay);
        }
        let exp = self
            .base_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let capped = exp.min(self.max_delay);
        // Full jitter in [50%, 100%].
        let mut b = [0u8; 2];
        let r = if getrandom::fill(&mut b).is_ok() {
            u16::from_le_bytes(b)
        } else {
            u16::MAX
        };
        capped.mul_f64(0.5 + 0.5 * f64::from(r) / f64::from(u16::MAX))
    }
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// An incremental SSE parser: feed it bytes as they arrive, get complete events back.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    event: Option<String>,
    data: String,
    has_data: bool,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses what `chunk` completes.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, LlmError> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8(line)
                .map_err(|_| LlmError::Protocol("the event stream is not UTF-8".into()))?;
            self.line(&line, &mut events);
        }
        if self.buf.len() > 16 * 1024 * 1024 {
            return Err(LlmError::Protocol(
                "an event-stream line is longer than 16 MiB".into(),
            ));
        }
        Ok(events)
    }

    /// The event left when the stream ends without a final blank line.
    pub fn finish(&mut self) -> Result<Option<SseEvent>, LlmError> {
        let mut events = Vec::new();
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            let line = String::from_utf8(rest)
                .map_err(|_| LlmError::Protocol("the event stream is not UTF-8".into()))?;
            self.line(line.trim_end_matches('\r'), &mut events);
        }
        self.line("", &mut events);
        Ok(events.pop())
    }

    fn line(&mut self, line: &str, events: &mut Vec<SseEvent>) {
        if line.is_empty() {
            if self.has_data {
                events.push(SseEvent {
                    event: self.event.take(),
                    data: std::mem::take(&mut self.data),
                });
            }
            self.event = None;
            self.data.clear();
            self.has_data = false;
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_string()),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
    }
}

/// What a provider does with the events of one attempt.
pub trait StreamParser: Send {
    /// Handles one event. Returns `Ok(true)` when the stream is complete.
    fn event(&mut self, event: SseEvent, on_delta: DeltaSink<'_>) -> Result<bool, LlmError>;
    /// The assistant turn once the stream ended (`complete` says whether [`Self::event`] said so).
    fn finish(self, complete: bool) -> Result<ChatResponse, LlmError>;
}

/// Why one attempt failed, and whether another may follow.
enum Failure {
    Retry {
        error: LlmError,
        retry_after: Option<Duration>,
    },
    Fatal(LlmError),
}

pub struct Transport {
    client: reqwest::Client,
    retry: Retry,
    idle_timeout: Duration,
}

impl Transport {
    pub fn new() -> Result<Self, LlmError> {
        // reqwest is built without a bundled crypto provider; the binary installs ring at
        // startup. Installing it here too covers tests and library users (a second install is
        // refused harmlessly).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("weldr-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| LlmError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            client,
            retry: Retry::default(),
            idle_timeout: Duration::from_secs(120),
        })
    }

    pub fn set_retry(&mut self, retry: Retry) {
        self.retry = Retry {
            attempts: retry.attempts.max(1),
            ..retry
        };
    }

    pub fn set_idle_timeout(&mut self, idle: Duration) {
        self.idle_timeout = idle;
    }

    /// POSTs `body` to `url` and streams the answer's events into a fresh parser per attempt.
    pub async fn stream<P: StreamParser>(
        &self,
        url: &str,
        headers: HeaderMap,
        body: &Value,
        new_parser: impl Fn() -> P,
        on_delta: DeltaSink<'_>,
    ) -> Result<ChatResponse, LlmError> {
        let emitted = AtomicBool::new(false);
        let sink = |d: Delta| {
            emitted.store(true, Ordering::Relaxed);
            on_delta(d);
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let failure = match self
                .attempt(url, headers.clone(), body, new_parser(), &sink)
                .await
            {
                Ok(response) => return Ok(response),
                Err(f) => f,
            };
            match failure {
                Failure::Fatal(e) => return Err(e),
                Failure::Retry { error, retry_after } => {
                    let error = with_attempts(error, attempt);
                    if attempt >= self.retry.attempts || emitted.load(Ordering::Relaxed) {
                        return Err(error);
                    }
                    tracing::warn!(attempt, %url, error = %error, "LLM request failed; retrying");
                    tokio::time::sleep(self.retry.delay(attempt, retry_after)).await;
                }
            }
        }
    }

    async fn attempt<P: StreamParser>(
        &self,
        url: &str,
        headers: HeaderMap,
        body: &Value,
        mut parser: P,
        on_delta: DeltaSink<'_>,
    ) -> Result<ChatResponse, Failure> {
        let send = self.client.post(url).headers(headers).json(body).send();
        let response = match tokio::time::timeout(self.idle_timeout, send).await {
            Err(_) => return Err(unavailable("no response before the timeout".into())),
            Ok(Err(e)) => return Err(unavailable(describe(&e))),
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        if !status.is_success() {
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(|s| s.min(3600.0))
            };
            // `retry-after-ms` (OpenAI, Anthropic) is finer than `retry-after` (seconds).
            let header_delay = header("retry-after-ms")
                .map(|ms| Duration::from_secs_f64(ms / 1000.0))
                .or_else(|| header("retry-after").map(Duration::from_secs_f64));
            let text = match tokio::time::timeout(self.idle_timeout, response.text()).await {
                Ok(Ok(t)) => t,
                _ => String::new(),
            };
            // Gemini states its delay in the error body only (`RetryInfo.retryDelay`).
            let retry_after = header_delay.or_else(|| retry_delay_in_body(&text));
            let message = format!("HTTP {}: {}", status.as_u16(), error_message(&text));
            return Err(match status.as_u16() {
                401 | 403 => Failure::Fatal(LlmError::Auth(message)),
                429 => Failure::Retry {
                    error: LlmError::RateLimited {
                        attempts: 0,
                        message,
                    },
                    retry_after,
                },
                408 | 500..=599 => Failure::Retry {
                    error: LlmError::Unavailable {
                        attempts: 0,
                        message,
                    },
                    retry_after,
                },
                _ => Failure::Fatal(LlmError::Refused(message)),
            });
        }
        let mut sse = SseParser::new();
        let mut stream = response.bytes_stream();
        let mut complete = false;
        'read: loop {
            let chunk = match tokio::time::timeout(self.idle_timeout, stream.next()).await {
                Err(_) => {
                    return Err(unavailable(format!(
                        "no data for {}s while streaming",
                        self.idle_timeout.as_secs()
                    )));
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(unavailable(describe(&e))),
                Ok(Some(Ok(c))) => c,
            };
            for event in sse.push(&chunk).map_err(fatal)? {
                if parser.event(event, on_delta).map_err(classify)? {
                    complete = true;
                    break 'read;
                }
            }
        }
        if !complete && let Some(event) = sse.finish().map_err(fatal)? {
            complete = parser.event(event, on_delta).map_err(classify)?;
        }
        parser.finish(complete).map_err(classify)
    }
}

fn fatal(e: LlmError) -> Failure {
    Failure::Fatal(e)
}

/// Errors a parser reports: a provider's in-stream "overloaded" or a cut stream may be retried.
fn classify(e: LlmError) -> Failure {
    match e {
        LlmError::Unavailable { .. } | LlmError::RateLimited { .. } => Failure::Retry {
            error: e,
            retry_after: None,
        },
        other => Failure::Fatal(other),
    }
}

fn unavailable(message: String) -> Failure {
    Failure::Retry {
        error: LlmError::Unavailable {
            attempts: 0,
            message,
        },
        retry_after: None,
    }
}

fn with_attempts(e: LlmError, n: u32) -> LlmError {
    match e {
        LlmError::Unavailable { message, .. } => LlmError::Unavailable {
            attempts: n,
            message,
        },
        LlmError::RateLimited { message, .. } => LlmError::RateLimited {
            attempts: n,
            message,
        },
        other => other,
    }
}

/// A reqwest error without the URL's query (keys never travel in URLs here, but be safe).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_connect() {
        "cannot connect"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_body() || e.is_decode() {
        "the response broke off"
    } else {
        "request failed"
    };
    let mut msg = format!("{kind}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// The provider's error message from an error body (`{"error":{"message":..}}`, also inside a
/// one-element array as Gemini sometimes sends), else the body's start.
pub fn error_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let v = match parsed {
        Some(Value::Array(mut a)) if !a.is_empty() => Some(a.swap_remove(0)),
        other => other,
    };
    if let Some(v) = v {
        let err = v.get("error").unwrap_or(&v);
        if let Some(m) = err.get("message").and_then(Value::as_str) {
            return m.to_string();
        }
        if let Some(m) = err.as_str() {
            return m.to_string();
        }
    }
    let t = body.trim();
    if t.is_empty() {
        return "(no body)".into();
    }
    t.chars().take(500).collect()
}

/// The delay a Google API error body asks for: `error.details[]` of type `RetryInfo` with a
/// protobuf duration such as `"37s"` or `"1.5s"`.
pub fn retry_delay_in_body(body: &str) -> Option<Duration> {
    let v: Value = serde_json::from_str(body).ok()?;
    let v = match v {
        Value::Array(mut a) if !a.is_empty() => a.swap_remove(0),
        other => other,
    };
    v["error"]["details"]
        .as_array()?
        .iter()
        .filter(|d| {
            d["@type"]
                .as_str()
                .is_some_and(|t| t.ends_with("google.rpc.RetryInfo"))
        })
        .find_map(|d| d["retryDelay"].as_str())
        .and_then(|d| d.trim().strip_suffix('s'))
        .and_then(|secs| secs.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(3600.0)))
}

/// A base URL without its trailing slashes.
pub fn trim_base(base: &str) -> String {
    base.trim().trim_end_matches('/').to_string()
}

/// A header value from a key; a key that cannot be a header is a configuration error.
pub fn header_value(var: &str, value: &str) -> Result<reqwest::header::HeaderValue, LlmError> {
    let mut v = reqwest::header::HeaderValue::from_str(value)
        .map_err(|_| LlmError::Config(format!("{var} contains characters a header cannot")))?;
    v.set_sensitive(true);
    Ok(v)
}

/// Parses JSON from an event's data.
pub fn json(data: &str) -> Result<Value, LlmError> {
    serde_json::from_str(data).map_err(|e| {
        let start: String = data.chars().take(200).collect();
        LlmError::Protocol(format!("event data is not JSON ({e}): {start}"))
    })
}

/// The arguments of a call; in a turn `cut` off at the output limit, None when they broke off
/// (the call is left out; the engine drops the whole turn and asks again).
pub fn call_input(name: &str, raw: &str, cut: bool) -> Result<Option<Value>, LlmError> {
    match tool_input(name, raw) {
        Ok(input) => Ok(Some(input)),
        Err(_) if cut => Ok(None),
        Err(e) => Err(e),
    }
}

/// Parses assembled tool-call arguments; empty means `{}`.
pub fn tool_input(name: &str, raw: &str) -> Result<Value, LlmError> {
    if raw.trim().is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_str(raw).map_err(|e| {
        LlmError::Protocol(format!(
            "the arguments of tool call {name:?} are not JSON: {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_split_anywhere() {
        let text = "event: a\ndata: {\"x\":1}\n\n: comment\r\ndata: one\r\ndata: two\r\n\r\ndata: [DONE]\n\n";
        for split in 0..text.len() {
            let mut p = SseParser::new();
            let mut events = p.push(&text.as_bytes()[..split]).unwrap();
            events.extend(p.push(&text.as_bytes()[split..]).unwrap());
            assert_eq!(p.finish().unwrap(), None);
            assert_eq!(
                events,
                vec![
                    SseEvent {
                        event: Some("a".into()),
                        data: "{\"x\":1}".into()
                    },
                    SseEvent {
                        event: None,
                        data: "one\ntwo".into()
                    },
                    SseEvent {
                        event: None,
                        data: "[DONE]".into()
                    },
                ]
            );
        }
    }

    #[test]
    fn sse_unterminated_last_event() {
        let mut p = SseParser::new();
        assert!(p.push(b"data: tail").unwrap().is_empty());
        assert_eq!(p.finish().unwrap().unwrap().data, "tail");
    }

    #[test]
    fn sse_bad_utf8_is_protocol() {
        let mut p = SseParser::new();
        assert!(matches!(
            p.push(b"data: \xff\xfe\n"),
            Err(LlmError::Protocol(_))
        ));
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            error_message(r#"{"type":"error","error":{"type":"x","message":"bad key"}}"#),
            "bad key"
        );
        assert_eq!(error_message(r#"[{"error":{"message":"g"}}]"#), "g");
        assert_eq!(error_message(""), "(no body)");
        assert_eq!(error_message("plain"), "plain");
    }

    #[test]
    fn gemini_retry_delay_from_the_error_body() {
        let body = r#"{"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure"},
                        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}]}}"#;
        assert_eq!(retry_delay_in_body(body), Some(Duration::from_secs(37)));
        let body = r#"[{"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1.5s"}]}}]"#;
        assert_eq!(retry_delay_in_body(body), Some(Duration::from_millis(1500)));
        assert_eq!(retry_delay_in_body(r#"{"error": {"message": "x"}}"#), None);
        assert_eq!(retry_delay_in_body("not json"), None);
        // The retry waits what was stated, capped.
        let r = Retry::default();
        assert_eq!(
            r.delay(1, Some(Duration::from_secs(37))),
            Duration::from_secs(37)
        );
        assert_eq!(r.delay(1, Some(Duration::from_secs(600))), r.max_delay);
    }

    #[test]
    fn backoff_is_capped() {
        let r = Retry {
            attempts: 4,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(300),
        };
        assert!(r.delay(1, None) <= Duration::from_millis(100));
        assert!(r.delay(10, None) <= Duration::from_millis(300));
        assert!(r.delay(10, None) >= Duration::from_millis(150));
        assert_eq!(
            r.delay(1, Some(Duration::from_secs(99))),
            Duration::from_millis(300)
        );
    }
}
