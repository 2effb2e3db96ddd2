//! The backup's building blocks: a full copy plus the increments built from the writer's notes
//! rebuild exactly the store as each increment's snapshot held it (every table, events trimmed
//! to the retention included), and a point in time is exactly the state after that increment.

use std::collections::HashMap;
use std::sync::Arc;

use weldr_storage::backup::{self, Loader, Op, decode_ops, encode_ops};
use weldr_storage::events::NoObserver;
use weldr_storage::tables::{PROJECTS, SESSIONS, VERSIONS};
use weldr_storage::{NewEvent, Store, StoreOptions, StreamKey};

fn open(path: &std::path::Path) -> Store {
    let options = StoreOptions {
        event_retention: 40,
        track_changes: true,
        ..StoreOptions::default()
    };
    Store::open(path, options, Arc::new(NoObserver)).unwrap()
}

fn dump_all(rtx: &weldr_storage::redb::ReadTransaction) -> Vec<Op> {
    let mut ops = Vec::new();
    backup::dump(rtx, &mut |op| {
        ops.push(op);
        Ok(())
    })
    .unwrap();
    ops
}

/// A small deterministic generator (no dependency for one test).
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_and_its_increments_rebuild_every_point_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("state.redb"));
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // Something before the copy.
    store
        .writer()
        .write(|ctx| {
            ctx.table(PROJECTS)?.insert("p0", &b"before"[..])?;
            Ok(())
        })
        .await
        .unwrap();
    let (_, rtx) = store.take_changes().unwrap().unwrap();
    let copy = dump_all(&rtx);
    let mut shipped = backup::stream_heads(&rtx).unwrap();
    drop(rtx);

    let mut increments: Vec<Vec<u8>> = Vec::new();
    let mut expected: Vec<Vec<Op>> = Vec::new();
    for round in 0..12u64 {
        // Concurrent jobs: batches mix appends, inserts and removals across tables.
        let mut jobs = Vec::new();
        for j in 0..(5 + rng.next(20)) {
            let kind = rng.next(4);
            let n = rng.next(30);
            let w = store.clone();
            jobs.push(tokio::spawn(async move {
                match kind {
                    0 => {
                        let stream = StreamKey::new("p", &format!("b{}", n % 3));
                        let events = (0..1 + n % 7)
                            .map(|i| NewEvent {
                                kind: "text".into(),
                                data: format!("{{\"r\":{round},\"j\":{j},\"i\":{i}}}"),
                            })
                            .collect();
                        w.writer().append(stream, events).await.map(|_| ())
                    }
                    1 => {
                        w.writer()
                            .write(move |ctx| {
                                let key = format!("p{n}");
                                let value = format!("round {round} job {j}");
                                ctx.table(PROJECTS)?
                                    .insert(key.as_str(), value.as_bytes())?;
                                let mut v = ctx.table(VERSIONS)?;
                                v.insert(("p", "b", n), value.as_bytes())?;
                                Ok(())
                            })
                            .await
                    }
                    2 => {
                        w.writer()
                            .write(move |ctx| {
                                ctx.table(PROJECTS)?.remove(format!("p{n}").as_str())?;
                                ctx.table(VERSIONS)?.remove(("p", "b", n))?;
                                Ok(())
                            })
                            .await
                    }
                    _ => {
                        w.writer()
                            .write(move |ctx| {
                                let mut s = ctx.table(SESSIONS)?;
                                s.insert(format!("s{n}").as_str(), &b"x"[..])?;
                                // Written and removed in one batch: a removal must ship.
                                s.insert("transient", &b"y"[..])?;
                                s.remove("transient")?;
                                Ok(())
                            })
                            .await
                    }
                }
            }));
        }
        for job in jobs {
            job.await.unwrap().unwrap();
        }
        if round == 3 {
            // Let the append log's checkpoint run (it follows an append by a second): it writes
            // machine-local `meta` keys no increment carries, and no copy may hold either.
            let stream = StreamKey::new("p", "b0");
            let event = NewEvent {
                kind: "text".into(),
                data: "{}".into(),
            };
            store.writer().append(stream, vec![event]).await.unwrap();
            tokio::time::sleep(weldr_storage::wal::CHECKPOINT_INTERVAL * 3 / 2).await;
        }
        let (pending, rtx) = store.take_changes().unwrap().unwrap();
        assert!(!pending.overflow);
        let mut ops = Vec::new();
        backup::changes(&rtx, &pending, &mut shipped, &mut |op| {
            ops.push(op);
            Ok(())
        })
        .unwrap();
        let mut payload = Vec::new();
        encode_ops(&ops, &mut payload);
        increments.push(payload);
        expected.push(dump_all(&rtx));
    }
    let (pending, _) = store.take_changes().unwrap().unwrap();
    assert!(
        pending.is_empty(),
        "nothing was written after the last take"
    );

    for point in [0, 3, 5, increments.len() - 1] {
        let path = dir.path().join(format!("restored-{point}.redb"));
        let mut loader = Loader::create(&path).unwrap();
        for op in &copy {
            loader.apply(op).unwrap();
        }
        for payload in &increments[..=point] {
            for op in decode_ops(payload).unwrap() {
                loader.apply(&op).unwrap();
            }
        }
        loader.finish().unwrap();
        let restored = weldr_storage::redb::Database::open(&path).unwrap();
        let rtx = {
            use weldr_storage::redb::ReadableDatabase;
            restored.begin_read().unwrap()
        };
        let got = dump_all(&rtx);
        let want = &expected[point];
        let tables = |ops: &[Op]| {
            let mut n: HashMap<String, usize> = HashMap::new();
            for op in ops {
                if let Op::Put { table, .. } = op {
                    *n.entry(table.clone()).or_default() += 1;
                }
            }
            n
        };
        assert_eq!(
            tables(&got),
            tables(want),
            "entries per table at point {point}"
        );
        assert!(got == *want, "the store restored to point {point} differs");
    }
}

#[test]
fn a_damaged_payload_is_refused() {
    let ops = vec![Op::Put {
        table: "projects".into(),
        key: b"p".to_vec(),
        value: b"v".to_vec(),
    }];
    let mut payload = Vec::new();
    encode_ops(&ops, &mut payload);
    assert_eq!(decode_ops(&payload).unwrap(), ops);
    assert!(decode_ops(&payload[..payload.len() - 1]).is_err());
    let dir = tempfile::tempdir().unwrap();
    let mut loader = Loader::create(&dir.path().join("x.redb")).unwrap();
    let unknown = Op::Put {
        table: "no_such_table".into(),
        key: vec![],
        value: vec![],
    };
    assert!(loader.apply(&unknown).is_err());
}
