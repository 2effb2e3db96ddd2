//! Restoring the store from its backup: at start when `state.redb` is missing (or holds
//! nothing), or with `weldr-agent restore-store [--at TIME]`.
//!
//! The newest generation whose copy was taken at or before the point asked for is chosen (one
//! without a manifest, a copy that never finished, is passed over); its parts are verified
//! against the manifest and their frames, then its increments are applied in sequence up to
//! the point. A part or increment that does not verify, or a missing increment in the
//! sequence, refuses the restore and names the newest point that does verify, to be asked for
//! with `--at`. The database is built in `state.redb.restoring` and renamed into place only
//! when complete.

use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;

use weldr_storage::backup::{Loader, Op, decode_ops};

use super::BackupError;
use super::format::{self, KIND_FULL, KIND_INCREMENT, Manifest};
use crate::sync::SyncError;
use crate::sync::store::Store as Objects;

/// The largest object a restore reads (a part or an increment is far smaller).
const MAX_OBJECT: u64 = 64 << 20;

/// What a restore did.
#[derive(Debug, Clone)]
pub struct Restored {
    pub generation: String,
    /// When the generation's full copy was taken.
    pub copy_at_ms: u64,
    /// The point restored to (the last increment applied, or the copy).
    pub at_ms: u64,
    pub increments: u64,
    pub ops: u64,
    /// Generations passed over, and why.
    pub skipped: Vec<String>,
}

/// The generations' names, oldest first.
pub async fn generations(objects: &Objects) -> Result<Vec<String>, BackupError> {
    let mut names: Vec<String> = list(objects, format::GENERATIONS)
        .await?
        .into_iter()
        .filter(|n| format::generation_time(n).is_some())
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// The names directly under `dir` (without the trailing `/` of directories).
async fn list(objects: &Objects, dir: &str) -> Result<Vec<String>, BackupError> {
    objects.count();
    let entries = match objects.operator().list(dir).await {
        Ok(e) => e,
        Err(e) if e.kind() == opendal::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) if e.to_string().contains("NoSuchBucket") => return Ok(Vec::new()),
        Err(e) => return Err(SyncError::store(&format!("list {dir}"), e).into()),
    };
    Ok(entries
        .iter()
        .map(|e| e.name().trim_end_matches('/').to_string())
        .filter(|n| !n.is_empty() && format!("{n}/") != dir && !dir.ends_with(&format!("{n}/")))
        .collect())
}

/// The increments of `generation` as (seq, at_ms, name), in sequence.
async fn increments(
    objects: &Objects,
    generation: &str,
) -> Result<Vec<(u64, u64, String)>, BackupError> {
    let mut out: Vec<(u64, u64, String)> = list(objects, &format::dir(generation))
        .await?
        .into_iter()
        .filter_map(|n| format::parse_increment(&n).map(|(seq, at)| (seq, at, n)))
        .collect();
    out.sort();
    Ok(out)
}

async fn manifest(objects: &Objects, generation: &str) -> Result<Option<Manifest>, BackupError> {
    let Some(bytes) = objects
        .get_capped(&format::manifest_path(generation), 1 << 20)
        .await?
    else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        BackupError::Corrupt(format!(
            "the manifest of backup generation {generation} does not parse ({e})"
        ))
    })
}

/// Whether object storage holds any generation of a backup.
pub async fn exists(objects: &Objects) -> Result<bool, BackupError> {
    Ok(!generations(objects).await?.is_empty())
}

/// Restore into `target` (which must not exist) the newest point at or before `at_ms` (the
/// newest of all without it); `extra` ops are applied last (what a fresh, empty store held
/// that must not be lost, such as its tokens). None when there is no backup at all.
pub async fn restore(
    objects: &Objects,
    target: &Path,
    at_ms: Option<u64>,
    extra: Vec<Op>,
) -> Result<Option<Restored>, BackupError> {
    let names = generations(objects).await?;
    if names.is_empty() {
        return Ok(None);
    }
    let mut skipped = Vec::new();
    let mut chosen = None;
    for name in names.iter().rev() {
        let copy_at = format::generation_time(name).unwrap_or(0);
        if at_ms.is_some_and(|at| copy_at > at) {
            continue;
        }
        match manifest(objects, name).await? {
            Some(m) => {
                chosen = Some(m);
                break;
            }
            None => skipped.push(format!(
                "generation {name} has no manifest (its full copy did not finish)"
            )),
        }
    }
    let Some(manifest) = chosen else {
        let oldest = names
            .first()
            .and_then(|n| format::generation_time(n))
            .unwrap_or(0);
        return Err(BackupError::Corrupt(match at_ms {
            Some(at) if at < oldest => format!(
                "the backup holds nothing as old as {}: its oldest full copy is from {}",
                format::rfc3339(at),
                format::rfc3339(oldest)
            ),
            _ => format!(
                "the backup holds no finished full copy ({})",
                skipped.join("; ")
            ),
        }));
    };
    let tmp = restoring_path(target);
    let _ = std::fs::remove_file(&tmp);
    let result = load(objects, &manifest, &tmp, at_ms, extra, &names).await;
    match result {
        Ok(mut restored) => {
            std::fs::rename(&tmp, target).map_err(|e| {
                BackupError::Refused(format!(
                    "moving the restored store to {}: {e}",
                    target.display()
                ))
            })?;
            if let Some(dir) = target.parent()
                && let Ok(d) = std::fs::File::open(dir)
            {
                let _ = d.sync_all();
            }
            restored.skipped = skipped;
            Ok(Some(restored))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

pub fn restoring_path(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_owned();
    name.push(".restoring");
    PathBuf::from(name)
}

/// Build the database of `manifest`'s generation (and its increments up to `at_ms`) at `tmp`.
async fn load(
    objects: &Objects,
    manifest: &Manifest,
    tmp: &Path,
    at_ms: Option<u64>,
    extra: Vec<Op>,
    names: &[String],
) -> Result<Restored, BackupError> {
    let generation = manifest.generation.clone();
    let (send, payloads) = sync_channel::<Vec<u8>>(1);
    let path = tmp.to_path_buf();
    let loader = std::thread::Builder::new()
        .name("store-restore".into())
        .spawn(move || -> Result<u64, BackupError> {
            let mut loader = Loader::create(&path)?;
            for payload in payloads {
                for op in decode_ops(&payload)? {
                    loader.apply(&op)?;
                }
            }
            for op in &extra {
                loader.apply(op)?;
            }
            Ok(loader.finish()?)
        })
        .map_err(|e| BackupError::Refused(format!("starting the restore thread: {e}")))?;
    let fed = feed(objects, manifest, at_ms, names, &send).await;
    drop(send);
    let loaded = loader
        .join()
        .map_err(|_| BackupError::Refused("the restore thread panicked".into()))?;
    let (increments, point) = fed?;
    let ops = loaded?;
    Ok(Restored {
        generation,
        copy_at_ms: manifest.at_ms,
        at_ms: point,
        increments,
        ops,
        skipped: Vec::new(),
    })
}

/// Fetch, verify and hand to the loader the copy's parts and the increments up to `at_ms`;
/// answers (increments applied, the point reached).
async fn feed(
    objects: &Objects,
    manifest: &Manifest,
    at_ms: Option<u64>,
    names: &[String],
    send: &std::sync::mpsc::SyncSender<Vec<u8>>,
) -> Result<(u64, u64), BackupError> {
    let generation = &manifest.generation;
    let dir = format::dir(generation);
    let gone = || BackupError::Refused("the restore thread stopped".into());
    for (index, part) in manifest.parts.iter().enumerate() {
        let path = format!("{dir}{}", part.name);
        let damaged = |why: String| {
            let path = path.clone();
            async move {
                let before = newest_point_before(objects, names, generation).await;
                BackupError::Corrupt(format!(
                    "the full copy of backup generation {generation} is damaged: {path} {why}. {before}"
                ))
            }
        };
        let Some(bytes) = objects.get_capped(&path, MAX_OBJECT).await? else {
            return Err(damaged("is missing".into()).await);
        };
        if format::sha256_hex(&bytes) != part.sha256 {
            return Err(damaged("does not match the SHA-256 its manifest records".into()).await);
        }
        let frame = match format::unframe(bytes) {
            Ok(f) => f,
            Err(why) => return Err(damaged(why).await),
        };
        if frame.kind != KIND_FULL || frame.seq != index as u64 {
            return Err(damaged(format!("is not part {index} of a full copy")).await);
        }
        send.send(frame.payload).map_err(|_| gone())?;
    }
    let mut point = manifest.at_ms;
    let mut applied = 0u64;
    for (seq, at, name) in increments(objects, generation).await? {
        if at_ms.is_some_and(|limit| at > limit) {
            break;
        }
        let offer = |point: u64| {
            format!(
                "The newest point that verifies is {t} (generation {generation}, increment {applied}): \
                 restore it with `weldr-agent restore-store --at {t}`",
                t = format::rfc3339(point)
            )
        };
        if seq != applied + 1 {
            return Err(BackupError::Corrupt(format!(
                "backup generation {generation} is incomplete: increment {} is missing (the next \
                 one found is {seq}). {}",
                applied + 1,
                offer(point)
            )));
        }
        let path = format!("{dir}{name}");
        let checked = match objects.get_capped(&path, MAX_OBJECT).await? {
            None => Err("is missing".to_string()),
            Some(bytes) => format::unframe(bytes).and_then(|f| {
                if f.kind == KIND_INCREMENT && f.seq == seq && f.at_ms == at {
                    Ok(f)
                } else {
                    Err(format!(
                        "holds increment {} of {} where its name says {seq} of {}",
                        f.seq,
                        format::rfc3339(f.at_ms),
                        format::rfc3339(at)
                    ))
                }
            }),
        };
        let frame = match checked {
            Ok(f) => f,
            Err(why) => {
                return Err(BackupError::Corrupt(format!(
                    "backup generation {generation} is damaged: {path} {why}. {}",
                    offer(point)
                )));
            }
        };
        send.send(frame.payload).map_err(|_| gone())?;
        applied = seq;
        point = at;
    }
    Ok((applied, point))
}

/// Where to go when `generation`'s copy is damaged: the newest point of the newest older
/// generation that has a manifest.
async fn newest_point_before(objects: &Objects, names: &[String], generation: &str) -> String {
    for name in names.iter().rev().filter(|n| n.as_str() < generation) {
        if let Ok(Some(m)) = manifest(objects, name).await {
            let last = increments(objects, name)
                .await
                .ok()
                .and_then(|incs| incs.last().map(|(_, at, _)| *at))
                .unwrap_or(m.at_ms);
            return format!(
                "The newest point before it is {t} (generation {name}): restore it with \
                 `weldr-agent restore-store --at {t}`",
                t = format::rfc3339(last)
            );
        }
    }
    "No older generation holds a finished copy.".into()
}

/// A point in time for `--at`: RFC 3339 (`2026-12-05T01:02:03Z`) or milliseconds since the
/// epoch.
pub fn parse_point(text: &str) -> Result<u64, String> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    text.parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond().max(0) as u64)
        .map_err(|e| format!("{text:?} is not an RFC 3339 time (2026-12-05T01:02:03Z): {e}"))
}
