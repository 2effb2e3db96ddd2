//! The event stream: append → durable in redb → fan-out → SSE.
//!
//! [`EventBus`] is the redb writer's [`AppendObserver`]: after each commit it encodes every new
//! event once as an SSE frame and hands the shared bytes to that branch's broadcast ring. The
//! ring only accelerates live delivery; redb is the source of truth. A subscriber that finds a
//! gap or falls behind the ring reads the missing ids from redb ([`subscription`]), so it never
//! loses an event and the server never buffers more than one ring per branch.

pub mod cache;
pub mod subscription;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::broadcast;
use weldr_storage::{AppendObserver, Event, StreamKey};

pub use cache::FrameCache;
pub use subscription::{Cursor, Subscription};

/// Frames kept per branch for live subscribers before slow ones fall back to redb. tokio
/// allocates every slot up front (about 40 bytes each) for each watched branch, so the ring is
/// kept small: a subscriber that falls further behind reads the gap from redb, losing nothing.
pub const RING_CAPACITY: usize = 256;

/// One event, encoded once for every subscriber.
#[derive(Debug)]
pub struct Frame {
    pub id: u64,
    pub bytes: Bytes,
}

/// Event types are short lowercase words; checked before append so frames stay well-formed.
pub fn is_valid_event_type(kind: &str) -> bool {
    !kind.is_empty()
        && kind.len() <= 32
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// An event that cannot go into the log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EventError {
    #[error("event type must be 1-32 characters of a-z, 0-9, '-' or '_'")]
    InvalidType,
    #[error("event data must be a JSON object")]
    InvalidData,
}

/// Validate and normalise an event for the log: `fields` is a JSON object (or null); `id`,
/// `type` and `timestamp` are the log's and are dropped.
pub fn new_event(
    kind: &str,
    fields: serde_json::Value,
) -> Result<weldr_storage::NewEvent, EventError> {
    if !is_valid_event_type(kind) {
        return Err(EventError::InvalidType);
    }
    let mut map = match fields {
        serde_json::Value::Object(map) => map,
        serde_json::Value::Null => serde_json::Map::new(),
        _ => return Err(EventError::InvalidData),
    };
    for reserved in ["id", "type", "timestamp"] {
        map.remove(reserved);
    }
    Ok(weldr_storage::NewEvent {
        kind: kind.to_string(),
        data: serde_json::Value::Object(map).to_string(),
    })
}

/// Encode `id:`/`event:`/`data:`. `data` is the stored JSON object with `id`, `type` and
/// `timestamp` (ms since epoch) put first.
pub fn encode_frame(event: &Event, out: &mut Vec<u8>) {
    let mut head = String::with_capacity(64 + event.kind.len() * 2);
    let _ = write!(
        head,
        "id: {id}\nevent: {kind}\ndata: {{\"id\":{id},\"type\":\"{kind}\",\"timestamp\":{ts}",
        id = event.id,
        kind = event.kind,
        ts = event.at_ms
    );
    out.extend_from_slice(head.as_bytes());
    let body = event.data.trim();
    match body.strip_prefix('{').map(str::trim_start) {
        Some(rest) if rest != "}" && !rest.is_empty() => {
            out.push(b',');
            out.extend_from_slice(rest.as_bytes());
        }
        _ => out.push(b'}'),
    }
    out.extend_from_slice(b"\n\n");
}

pub fn frame_of(event: &Event) -> Frame {
    let mut buf = Vec::with_capacity(event.data.len() + 96);
    encode_frame(event, &mut buf);
    Frame {
        id: event.id,
        bytes: Bytes::from(buf),
    }
}

/// Per-branch broadcast rings for live subscribers, and the encoded blocks that subscribers
/// catching up share.
pub struct EventBus {
    rings: Mutex<HashMap<StreamKey, broadcast::Sender<Arc<Frame>>>>,
    pub frames: Arc<FrameCache>,
}

impl EventBus {
    /// A bus whose replay cache holds at most `cache_bytes` (0: no cache).
    pub fn new(cache_bytes: usize) -> Self {
        Self {
            rings: Mutex::default(),
            frames: Arc::new(FrameCache::new(cache_bytes)),
        }
    }

    /// A receiver for frames committed from now on.
    pub fn subscribe(&self, key: &StreamKey) -> broadcast::Receiver<Arc<Frame>> {
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        rings
            .entry(key.clone())
            .or_insert_with(|| broadcast::channel(RING_CAPACITY).0)
            .subscribe()
    }

    /// Open SSE subscribers of a branch (eviction never removes a watched branch).
    pub fn subscriber_count(&self, key: &StreamKey) -> usize {
        let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        rings.get(key).map(|s| s.receiver_count()).unwrap_or(0)
    }

    pub fn total_subscribers(&self) -> usize {
        let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        rings.values().map(|s| s.receiver_count()).sum()
    }
}

impl AppendObserver for EventBus {
    fn committed(&self, events: &[(StreamKey, Arc<Event>)]) {
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        for (key, event) in events {
            let Some(ring) = rings.get(key) else { continue };
            if ring.receiver_count() == 0 {
                rings.remove(key);
                continue;
            }
            let _ = ring.send(Arc::new(frame_of(event)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: &str, data: &str) -> String {
        let e = Event {
            id: 7,
            kind: kind.into(),
            data: data.into(),
            at_ms: 5,
        };
        let mut out = Vec::new();
        encode_frame(&e, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn frames_carry_id_type_and_time() {
        assert_eq!(
            frame("text", "{\"text\":\"hi\\nthere\"}"),
            "id: 7\nevent: text\ndata: {\"id\":7,\"type\":\"text\",\"timestamp\":5,\"text\":\"hi\\nthere\"}\n\n"
        );
        assert_eq!(
            frame("end", "{}"),
            "id: 7\nevent: end\ndata: {\"id\":7,\"type\":\"end\",\"timestamp\":5}\n\n"
        );
        let data = frame("status", "{\"status\":\"coding\"}");
        let json = data.lines().nth(2).unwrap().strip_prefix("data: ").unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["status"], "coding");
    }

    #[test]
    fn event_types() {
        assert!(is_valid_event_type("tool-call"));
        assert!(!is_valid_event_type("Text"));
        assert!(!is_valid_event_type("a\nb"));
        assert!(!is_valid_event_type(""));
    }
}
