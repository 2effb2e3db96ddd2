//! How the store's backup lies in object storage.
//!
//! ```text
//! generations/{generation}/full.json                      the copy's manifest, written last
//! generations/{generation}/full-{part:06}                 the copy, in parts of about 8 MiB
//! generations/{generation}/inc-{seq:012}-{at_ms:013}      increments 1, 2, ... after the copy
//! ```
//!
//! A generation's name starts with the time its copy was taken (`{at_ms:013}-{random}`), so
//! names sort by time; an increment's name carries its sequence number and the time of the
//! snapshot it brings the store to, so `--at` picks without reading. Every part and increment
//! is framed with its kind, sequence, time and the SHA-256 of all of it: a restore verifies
//! each object before it applies a single op of it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `WLRB`, then the frame's layout version.
const MAGIC: &[u8; 4] = b"WLRB";
const FORMAT: u8 = 1;
/// magic, format, kind, 2 reserved, seq u64, at_ms u64, sha-256.
const HEADER: usize = 4 + 1 + 1 + 2 + 8 + 8 + 32;

/// A part of a generation's full copy.
pub const KIND_FULL: u8 = 1;
/// An increment.
pub const KIND_INCREMENT: u8 = 2;

/// One verified object.
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub seq: u64,
    pub at_ms: u64,
    pub payload: Vec<u8>,
}

pub fn frame(kind: u8, seq: u64, at_ms: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(FORMAT);
    out.push(kind);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&at_ms.to_le_bytes());
    let digest = checksum(&out, payload);
    out.extend_from_slice(&digest);
    out.extend_from_slice(payload);
    out
}

fn checksum(head: &[u8], payload: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(head);
    h.update(payload);
    h.finalize().into()
}

/// Check an object and take it apart; the error says what is wrong with it.
pub fn unframe(mut bytes: Vec<u8>) -> Result<Frame, String> {
    if bytes.len() < HEADER {
        return Err(format!(
            "it is {} bytes, shorter than a frame header (truncated)",
            bytes.len()
        ));
    }
    if &bytes[..4] != MAGIC {
        return Err("it does not start with a backup frame header".into());
    }
    if bytes[4] != FORMAT {
        return Err(format!(
            "frame format {} is unknown (a backup of a newer version?)",
            bytes[4]
        ));
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let (kind, seq, at_ms) = (bytes[5], u64_at(8), u64_at(16));
    let stored = &bytes[24..HEADER];
    if checksum(&bytes[..24], &bytes[HEADER..]) != stored {
        return Err("its SHA-256 does not match (changed or truncated)".into());
    }
    let payload = bytes.split_off(HEADER);
    Ok(Frame {
        kind,
        seq,
        at_ms,
        payload,
    })
}

/// A generation's manifest (`full.json`), written after every part of the copy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format: u8,
    pub generation: String,
    /// When the copy's snapshot was taken.
    pub at_ms: u64,
    pub parts: Vec<PartRef>,
    /// Ops in the copy (table entries).
    pub ops: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartRef {
    pub name: String,
    pub bytes: u64,
    /// SHA-256 of the whole framed object, hex.
    pub sha256: String,
}

pub const MANIFEST_FORMAT: u8 = 1;

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub const GENERATIONS: &str = "generations/";

pub fn generation_name(at_ms: u64) -> String {
    let mut random = [0u8; 4];
    // Two machines starting a generation in the same millisecond (a split brain) still differ.
    if getrandom::fill(&mut random).is_err() {
        random = (std::process::id()).to_le_bytes();
    }
    format!("{at_ms:013}-{}", hex::encode(random))
}

/// When a generation's copy was taken, from its name.
pub fn generation_time(name: &str) -> Option<u64> {
    name.split_once('-')?.0.parse().ok()
}

pub fn dir(generation: &str) -> String {
    format!("{GENERATIONS}{generation}/")
}

pub fn manifest_path(generation: &str) -> String {
    format!("{}full.json", dir(generation))
}

pub fn part_name(part: usize) -> String {
    format!("full-{part:06}")
}

pub fn increment_name(seq: u64, at_ms: u64) -> String {
    format!("inc-{seq:012}-{at_ms:013}")
}

/// (seq, at_ms) of an increment's object name.
pub fn parse_increment(name: &str) -> Option<(u64, u64)> {
    let (seq, at) = name.strip_prefix("inc-")?.split_once('-')?;
    Some((seq.parse().ok()?, at.parse().ok()?))
}

/// RFC 3339 in UTC with milliseconds.
pub fn rfc3339(at_ms: u64) -> String {
    jiff::Timestamp::from_millisecond(at_ms as i64)
        .map(|t| format!("{t:.3}"))
        .unwrap_or_else(|_| format!("{at_ms} ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_verify_and_any_change_is_found() {
        let framed = frame(KIND_INCREMENT, 7, 1_700_000_000_123, b"payload");
        let back = unframe(framed.clone()).unwrap();
        assert_eq!(
            (back.kind, back.seq, back.at_ms, back.payload.as_slice()),
            (KIND_INCREMENT, 7, 1_700_000_000_123, &b"payload"[..])
        );
        for i in 0..framed.len() {
            let mut bad = framed.clone();
            bad[i] ^= 1;
            assert!(unframe(bad).is_err(), "flipping byte {i} went unnoticed");
        }
        assert!(unframe(framed[..framed.len() - 1].to_vec()).is_err());
        assert!(unframe(framed[..10].to_vec()).is_err());
    }

    #[test]
    fn names_parse_back() {
        assert_eq!(parse_increment(&increment_name(42, 99)), Some((42, 99)));
        assert_eq!(parse_increment("full-000001"), None);
        let generation = generation_name(1_700_000_000_000);
        assert_eq!(generation_time(&generation), Some(1_700_000_000_000));
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
