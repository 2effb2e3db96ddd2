//! What the HTTP providers share: one reqwest client, retries with backoff and jitter
//! (`backon`), the idle timeout between chunks, error classification, and the server-sent
//! events of a response (`eventsource-stream`, behind a small shim: [`sse_events`]).
//!
//! A provider builds the request body and a [`StreamParser`] per attempt; [`Transport::stream`]
//! sends, retries what may be retried (429, 5xx, connection errors, a stream that broke before
//! any delta reached the caller) and feeds the server-sent events to the parser. Nothing runs
//! detached: dropping the future (the workflow's cancel does) ends a request, a stream or a
//! wait between attempts at once.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use eventsource_stream::{EventStreamError, Eventsource};
use futures_util::{Stream, StreamExt};
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
    /// The computed waits between attempts: wait `n` lies in [50%, 100%] of
    /// `min(base_delay * 2^(n-1), max_delay)`.
    fn backoff(&self) -> ExponentialBuilder {
        // backon's jitter adds up to 100% to a delay, so it grows half-sized delays.
        ExponentialBuilder::new()
            .with_min_delay(self.base_delay.min(self.max_delay) / 2)
            .with_max_delay(self.max_delay / 2)
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(self.attempts.saturating_sub(1) as usize)
    }

    /// The wait before the next attempt: none once the attempts are used up (`computed` is
    /// None), else the delay the provider stated (capped at `max_delay`) or the computed one.
    fn next_wait(&self, computed: Option<Duration>, stated: Option<Duration>) -> Option<Duration> {
        computed.map(|computed| stated.map_or(computed, |s| s.min(self.max_delay)))
    }
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field; None for the default type (`message`).
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Longest event-stream line accepted (a line is held in memory until it is complete).
const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// The server-sent events of a response `body`, parsed by `eventsource-stream`.
///
/// A shim in front of the parser keeps what the parser alone would not:
/// - it hands the parser one whole line at a time: the parser parses a partial line again
///   from its start at every chunk (quadratic for a long line; Gemini sends a tool call in
///   one) and copies its buffer's rest after every line (quadratic for a chunk of many
///   lines); a line is bounded at [`MAX_LINE_BYTES`];
/// - it decodes UTF-8 and fails at the first bad byte, a protocol error: the parser's decoder
///   takes a bad byte for an unfinished character and buffers the rest of the stream;
/// - it ends the stream with a blank line, so that a last event the server did not terminate
///   still counts (the parser, as browsers do, would drop it);
/// - it waits at most `idle` for each chunk.
fn sse_events<S>(body: S, idle: Duration) -> impl Stream<Item = Result<SseEvent, Failure>>
where
    S: Stream<Item = Result<Bytes, Failure>> + Unpin,
{
    let text =
        futures_util::stream::unfold(Some((body, Lines::default())), move |state| async move {
            let (mut body, mut lines) = state?;
            loop {
                let chunk = match tokio::time::timeout(idle, body.next()).await {
                    Err(_) => {
                        let message = format!("no data for {}s while streaming", idle.as_secs());
                        return Some((Err(unavailable(message)), None));
                    }
                    Ok(None) => return Some((lines.finish().map_err(fatal), None)),
                    Ok(Some(Err(failure))) => return Some((Err(failure), None)),
                    Ok(Some(Ok(chunk))) => chunk,
                };
                match lines.push(&chunk) {
                    Ok(None) => {}
                    Ok(Some(text)) => return Some((Ok(text), Some((body, lines)))),
                    Err(e) => return Some((Err(fatal(e)), None)),
                }
            }
        })
        .flat_map(|text| {
            let lines: Vec<Result<String, Failure>> = match text {
                Ok(text) => text
                    .split_inclusive(['\n', '\r'])
                    .map(|line| Ok(line.to_string()))
                    .collect(),
                Err(failure) => vec![Err(failure)],
            };
            futures_util::stream::iter(lines)
        });
    text.eventsource().map(|event| match event {
        Ok(e) => Ok(SseEvent {
            event: (e.event != "message").then_some(e.event),
            data: e.data,
        }),
        Err(EventStreamError::Transport(failure)) => Err(failure),
        Err(EventStreamError::Utf8(_)) => Err(fatal(not_utf8())),
        Err(EventStreamError::Parser(e)) => Err(fatal(LlmError::Protocol(format!(
            "the event stream is malformed: {e}"
        )))),
    })
}

/// Cuts a byte stream after its last line end so far (LF or CR, never inside a UTF-8
/// character), holding back the unfinished line.
#[derive(Debug, Default)]
struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    /// The complete lines `chunk` finishes, as text; None while a line is still open.
    fn push(&mut self, chunk: &[u8]) -> Result<Option<String>, LlmError> {
        let end = chunk.iter().rposition(|&b| b == b'\n' || b == b'\r');
        let complete = end.map(|end| {
            let mut complete = std::mem::take(&mut self.partial);
            complete.extend_from_slice(&chunk[..=end]);
            complete
        });
        self.partial
            .extend_from_slice(&chunk[end.map_or(0, |end| end + 1)..]);
        if self.partial.len() > MAX_LINE_BYTES {
            return Err(LlmError::Protocol(format!(
                "an event-stream line is longer than {} MiB",
                MAX_LINE_BYTES >> 20
            )));
        }
        complete
            .map(|bytes| String::from_utf8(bytes).map_err(|_| not_utf8()))
            .transpose()
    }

    /// The rest at the end of the stream, closed by a blank line.
    fn finish(&mut self) -> Result<String, LlmError> {
        let mut rest = std::mem::take(&mut self.partial);
        rest.extend_from_slice(b"\n\n");
        String::from_utf8(rest).map_err(|_| not_utf8())
    }
}

fn not_utf8() -> LlmError {
    LlmError::Protocol("the event stream is not UTF-8".into())
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
        let attempts = AtomicU32::new(0);
        let sink = |d: Delta| {
            emitted.store(true, Ordering::Relaxed);
            on_delta(d);
        };
        let result = (|| {
            attempts.fetch_add(1, Ordering::Relaxed);
            self.attempt(url, headers.clone(), body, new_parser(), &sink)
        })
        .retry(self.retry.backoff())
        .sleep(tokio::time::sleep)
        // Once a delta reached the caller, a new attempt would repeat it.
        .when(|f| matches!(f, Failure::Retry { .. }) && !emitted.load(Ordering::Relaxed))
        .adjust(|f, computed| {
            let stated = match f {
                Failure::Retry { retry_after, .. } => *retry_after,
                Failure::Fatal(_) => None,
            };
            self.retry.next_wait(computed, stated)
        })
        .notify(|f, wait| {
            if let Failure::Retry { error, .. } = f {
                let attempt = attempts.load(Ordering::Relaxed);
                tracing::warn!(attempt, %url, error = %error, ?wait, "LLM request failed; retrying");
            }
        })
        .await;
        result.map_err(|failure| match failure {
            Failure::Fatal(e) => e,
            Failure::Retry { error, .. } => with_attempts(error, attempts.load(Ordering::Relaxed)),
        })
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
        let body = response
            .bytes_stream()
            .map(|chunk| chunk.map_err(|e| unavailable(describe(&e))));
        let mut events = std::pin::pin!(sse_events(body, self.idle_timeout));
        let mut complete = false;
        while let Some(event) = events.next().await {
            if parser.event(event?, on_delta).map_err(classify)? {
                complete = true;
                break;
            }
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

/// Did the provider refuse the request because the prompt does not fit the model's context
/// window? The engine can then shorten the history and ask again. Recognizes the refusals of
/// Anthropic (`prompt is too long`, `input length and max_tokens exceed context limit`),
/// OpenAI and vLLM (`maximum context length`, `context window`), Gemini (`input token count
/// ... exceeds the maximum`) and llama.cpp (`exceeds the available context size`).
pub fn is_context_overflow(e: &LlmError) -> bool {
    let LlmError::Refused(message) = e else {
        return false;
    };
    let m = message.to_ascii_lowercase();
    [
        "prompt is too long",
        "exceed context limit",
        "maximum context length",
        "context_length_exceeded",
        "exceeds the context window",
        "exceeds the maximum number of tokens",
        "exceeds the available context size",
    ]
    .iter()
    .any(|p| m.contains(p))
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

    /// The events of `chunks`, or the first failure's error.
    async fn events(chunks: &[&[u8]]) -> Result<Vec<SseEvent>, LlmError> {
        let body = futures_util::stream::iter(
            chunks
                .iter()
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        );
        let mut events = std::pin::pin!(sse_events(body, Duration::from_secs(60)));
        let mut out = Vec::new();
        while let Some(event) = events.next().await {
            match event {
                Ok(e) => out.push(e),
                Err(Failure::Fatal(e) | Failure::Retry { error: e, .. }) => return Err(e),
            }
        }
        Ok(out)
    }

    fn sse(event: Option<&str>, data: &str) -> SseEvent {
        SseEvent {
            event: event.map(str::to_string),
            data: data.to_string(),
        }
    }

    #[tokio::test]
    async fn sse_split_anywhere() {
        let text = "event: a\ndata: {\"x\":1}\n\n: comment\r\ndata: one\r\ndata: two\r\n\r\nevent: only\n\ndata: é€\n\ndata: [DONE]\n\n";
        let expected = vec![
            sse(Some("a"), "{\"x\":1}"),
            sse(None, "one\ntwo"),
            sse(None, "é€"),
            sse(None, "[DONE]"),
        ];
        let bytes = text.as_bytes();
        for split in 0..=bytes.len() {
            let got = events(&[&bytes[..split], &bytes[split..]]).await.unwrap();
            assert_eq!(got, expected, "split at {split}");
        }
        let one_byte_chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(events(&one_byte_chunks).await.unwrap(), expected);
    }

    #[tokio::test]
    async fn sse_unterminated_last_event() {
        for tail in [
            "data: tail",
            "data: tail\n",
            "data: tail\r",
            "data: tail\r\n",
        ] {
            assert_eq!(
                events(&[b"data: first\n\n", tail.as_bytes()])
                    .await
                    .unwrap(),
                vec![sse(None, "first"), sse(None, "tail")],
                "{tail:?}"
            );
        }
        assert_eq!(events(&[b": only a comment"]).await.unwrap(), vec![]);
        assert_eq!(events(&[]).await.unwrap(), vec![]);
    }

    #[tokio::test]
    async fn sse_bad_utf8_is_protocol() {
        for chunks in [
            [
                b"data: \xff\xfe\n".as_slice(),
                b"\ndata: more\n\n".as_slice(),
            ],
            [b"data: ok\n\ndata: \xe2\x82".as_slice(), b"".as_slice()],
        ] {
            assert!(
                matches!(events(&chunks).await, Err(LlmError::Protocol(m)) if m.contains("UTF-8")),
                "{chunks:?}"
            );
        }
    }

    #[tokio::test]
    async fn sse_overlong_line_is_protocol() {
        let big = vec![b'x'; MAX_LINE_BYTES / 2 + 1];
        let r = events(&[b"data: ", &big, &big, b"\n\n"]).await;
        assert!(matches!(r, Err(LlmError::Protocol(m)) if m.contains("longer")));
    }

    #[tokio::test]
    async fn sse_idle_body_times_out_as_retryable() {
        let body = futures_util::stream::iter([Ok(Bytes::from_static(b"data: x\n"))])
            .chain(futures_util::stream::pending());
        let mut events = std::pin::pin!(sse_events(body, Duration::from_millis(10)));
        match events.next().await {
            Some(Err(Failure::Retry { error, .. })) => {
                assert!(error.to_string().contains("no data"), "{error}")
            }
            _ => panic!("expected a retryable timeout"),
        }
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
    fn context_overflows_are_recognized() {
        for m in [
            "HTTP 400: prompt is too long: 210000 tokens > 200000 maximum",
            "HTTP 400: input length and `max_tokens` exceed context limit: 199759 + 8192 > 200000, decrease input length or `max_tokens` and try again",
            "HTTP 400: This model's maximum context length is 128000 tokens. However, you requested 130000 tokens.",
            "HTTP 400: The input token count (1200293) exceeds the maximum number of tokens allowed (1048576).",
            "HTTP 400: the request exceeds the available context size, try increasing it",
        ] {
            assert!(is_context_overflow(&LlmError::Refused(m.into())), "{m}");
        }
        assert!(!is_context_overflow(&LlmError::Refused(
            "HTTP 400: bad tool".into()
        )));
        assert!(!is_context_overflow(&LlmError::Protocol(
            "prompt is too long".into()
        )));
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
    }

    #[test]
    fn a_stated_delay_overrides_the_backoff_capped() {
        let r = Retry::default();
        let computed = Some(Duration::from_millis(700));
        let stated = Duration::from_secs(37);
        assert_eq!(r.next_wait(computed, Some(stated)), Some(stated));
        assert_eq!(
            r.next_wait(computed, Some(Duration::from_secs(600))),
            Some(r.max_delay)
        );
        assert_eq!(r.next_wait(computed, None), computed);
        // No wait at all once the attempts are used up, whatever the server asks.
        assert_eq!(r.next_wait(None, Some(stated)), None);
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        use backon::BackoffBuilder;
        let r = Retry {
            attempts: 6,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(300),
        };
        for _ in 0..200 {
            let waits: Vec<Duration> = r.backoff().build().collect();
            assert_eq!(waits.len(), 5, "attempts - 1 waits");
            for (n, wait) in waits.iter().enumerate() {
                let cap = (r.base_delay * (1 << n)).min(r.max_delay);
                assert!(*wait >= cap / 2 && *wait <= cap, "wait {n}: {wait:?}");
            }
        }
        let one = Retry {
            attempts: 1,
            ..Retry::default()
        };
        assert_eq!(one.backoff().build().count(), 0);
    }
}
