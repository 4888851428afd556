//! The engine against a model: full copies of every snapshot, compared after every step.

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::{rngs::SmallRng, Rng, SeedableRng};
use snapctl::store::format::OnFull;
use snapctl::store::SnapState;

use crate::util::*;

/// Random origin writes (any offset, any length, often across chunks), creates and deletes;
/// every snapshot and the origin are compared with the model after every step; `check` must
/// find the store clean, and a delete must free exactly the snapshot's `exclusive_bytes`.
fn model_run(seed: u64, chunk: u64, steps: usize) {
    // A partial last chunk on purpose.
    model_run_sized(seed, chunk, 64 * chunk + 1536, 16 << 20, steps)
}

/// [`model_run`] on an origin of `size` bytes (any size) and a store of `store_size` bytes.
fn model_run_sized(seed: u64, chunk: u64, size: u64, store_size: u64, steps: usize) {
    let (mut s, _o, _d) = mem_store(size, store_size, chunk, OnFull::FailWrites, seed);
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed);
    let mut model = read_all(&s, "origin");
    let mut snaps: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut writable: std::collections::BTreeSet<String> = Default::default();
    let mut next = 0;
    for step in 0..steps {
        let op = rng.gen_range(0..100);
        if op < 15 {
            // A batch, as the NBD server sends them: one preservation commit for all.
            let n = rng.gen_range(1..8);
            let mut writes = Vec::new();
            for _ in 0..n {
                let len = rng.gen_range(1..chunk as usize * 3).min(size as usize);
                let off = rng.gen_range(0..=size - len as u64);
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                writes.push((off, data));
            }
            let refs: Vec<(u64, &[u8])> = writes.iter().map(|(o, d)| (*o, d.as_slice())).collect();
            s.write_batch(&refs, false).unwrap();
            for (off, data) in &writes {
                model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
        } else if op < 48 {
            let len = match rng.gen_range(0..4) {
                0 => rng.gen_range(1..64),
                1 => rng.gen_range(1..chunk as usize * 3),
                2 => chunk as usize * rng.gen_range(1..20),
                _ => rng.gen_range(1..600),
            }
            .min(size as usize);
            let off = rng.gen_range(0..=size - len as u64);
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            s.write_origin(off, &data, rng.gen_bool(0.1)).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        } else if op < 56 && !writable.is_empty() && rng.gen_bool(0.6) {
            // a write into a writable snapshot
            let w = writable
                .iter()
                .nth(rng.gen_range(0..writable.len()))
                .unwrap()
                .clone();
            let len = rng.gen_range(1..chunk as usize * 3).min(size as usize);
            let off = rng.gen_range(0..=size - len as u64);
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            s.write_snapshot(&w, &[(off, &data)], rng.gen_bool(0.1))
                .unwrap();
            snaps.get_mut(&w).unwrap()[off as usize..off as usize + len].copy_from_slice(&data);
        } else if op < 60 {
            let name = format!("w{next}");
            next += 1;
            s.create_writable(&name, None, BTreeMap::new()).unwrap();
            snaps.insert(name.clone(), model.clone());
            writable.insert(name);
        } else if op < 63 && !snaps.is_empty() {
            let name = snaps
                .keys()
                .nth(rng.gen_range(0..snaps.len()))
                .unwrap()
                .clone();
            s.set_writable(&name).unwrap();
            writable.insert(name);
        } else if op < 72 {
            let name = format!("s{next}");
            next += 1;
            s.create(&name, None, BTreeMap::new(), None).unwrap();
            snaps.insert(name, model.clone());
        } else if op < 76 && !snaps.is_empty() {
            // a snapshot of a snapshot: the same point in time
            let from = snaps
                .keys()
                .nth(rng.gen_range(0..snaps.len()))
                .unwrap()
                .clone();
            let name = format!("s{next}");
            next += 1;
            let w = rng.gen_bool(0.4);
            s.create_from(&name, &from, None, BTreeMap::new(), w)
                .unwrap();
            snaps.insert(name.clone(), snaps[&from].clone());
            if w {
                writable.insert(name);
            }
        } else if op < 80 && !snaps.is_empty() {
            // restore the origin to a snapshot, with or without a backup
            let target = snaps
                .keys()
                .nth(rng.gen_range(0..snaps.len()))
                .unwrap()
                .clone();
            let backup = rng.gen_bool(0.5).then(|| {
                next += 1;
                format!("bk{next}")
            });
            s.restore(&target, backup.as_deref(), &mut |_, _| {})
                .unwrap();
            if let Some(b) = backup {
                snaps.insert(b, model.clone());
            }
            model = snaps[&target].clone();
        } else if !snaps.is_empty() {
            let k = rng.gen_range(0..snaps.len());
            let name = snaps.keys().nth(k).unwrap().clone();
            let excl = s.snapshot(&name).unwrap().owned_chunks() * chunk;
            let freed = s.delete(std::slice::from_ref(&name)).unwrap();
            assert_eq!(
                freed, excl,
                "seed {seed} step {step}: delete of {name} freed {freed}, exclusive said {excl}"
            );
            snaps.remove(&name);
            writable.remove(&name);
        }
        assert_eq!(
            read_all(&s, "origin"),
            model,
            "seed {seed} step {step}: origin"
        );
        for (name, img) in &snaps {
            assert!(
                read_all(&s, name) == *img,
                "seed {seed} step {step}: snapshot {name} differs"
            );
        }
        // Batched reads across views agree with the model.
        if !snaps.is_empty() {
            let names: Vec<&String> = snaps.keys().collect();
            let mut bufs: Vec<(String, u64, Vec<u8>)> = (0..4)
                .map(|_| {
                    let len = rng.gen_range(1..3 * chunk as usize).min(size as usize);
                    let off = rng.gen_range(0..=size - len as u64);
                    let v = if rng.gen_bool(0.3) {
                        "origin".to_string()
                    } else {
                        names[rng.gen_range(0..names.len())].clone()
                    };
                    (v, off, vec![0u8; len])
                })
                .collect();
            let mut reqs: Vec<snapctl::store::cow::ReadReq> = bufs
                .iter_mut()
                .map(|(v, off, b)| snapctl::store::cow::ReadReq {
                    view: v.as_str(),
                    off: *off,
                    buf: b.as_mut_slice(),
                })
                .collect();
            s.read_batch(&mut reqs).unwrap();
            for (v, off, b) in &bufs {
                let img = if v == "origin" { &model } else { &snaps[v] };
                assert!(
                    b[..] == img[*off as usize..*off as usize + b.len()],
                    "seed {seed} step {step}: batched read of {v}"
                );
            }
        }
        // diff never misses a chunk where two views differ
        if step % 5 == 0 && !snaps.is_empty() {
            let mut views: Vec<&String> = snaps.keys().collect();
            let origin = "origin".to_string();
            views.push(&origin);
            let a = views[rng.gen_range(0..views.len())];
            let b = views[rng.gen_range(0..views.len())];
            let img = |v: &String| if *v == origin { &model } else { &snaps[v] };
            let d = s.diff_chunks(a, b).unwrap();
            for c in 0..size.div_ceil(chunk) {
                let r = (c * chunk) as usize..((c + 1) * chunk).min(size) as usize;
                if img(a)[r.clone()] != img(b)[r] {
                    assert!(
                        d.binary_search(&c).is_ok(),
                        "seed {seed} step {step}: diff {a} {b} misses chunk {c}"
                    );
                }
            }
        }
        if step % 10 == 0 || step + 1 == steps {
            let rep = s.check().unwrap();
            assert!(rep.is_clean(), "seed {seed} step {step}: {rep:?}");
        }
    }
}

#[test]
fn every_snapshot_stays_exact_under_random_writes_creates_and_deletes() {
    for seed in 0..12 {
        model_run(seed, 4096, 120);
    }
}

/// Issue 18, as a property: origins of random sizes (any byte count, as files have, or a whole
/// number of 512-byte sectors, as devices have; smaller than one chunk, or with a partial last
/// chunk, or a whole number of chunks) under 4 KiB, 64 KiB and 1 MiB chunks, every view exact
/// against the model after every step.
#[test]
fn origins_of_any_size_are_exact_under_every_chunk_size() {
    let mut rng = SmallRng::seed_from_u64(18);
    for seed in 0..18u64 {
        let chunk = [4096u64, 65536, 1 << 20][seed as usize % 3];
        let chunks = rng.gen_range(0..6u64);
        let size = match seed / 3 % 3 {
            0 => chunks * chunk + rng.gen_range(1..chunk),
            1 => chunks * chunk + 512 * rng.gen_range(1..chunk / 512),
            _ => (chunks + 1) * chunk,
        };
        let store = (64 << 20) + 24 * (chunks + 1) * chunk;
        eprintln!("seed {seed}: origin of {size} bytes, {chunk}-byte chunks");
        model_run_sized(seed + 1800, chunk, size, store, 60);
    }
}

#[test]
fn larger_chunks_behave_the_same() {
    for seed in 100..104 {
        model_run(seed, 65536, 80);
    }
}

#[test]
fn an_origin_write_copies_each_chunk_once_whatever_the_snapshot_count() {
    let chunk = 4096;
    let (mut s, _o, _d) = mem_store(256 * chunk, 16 << 20, chunk, OnFull::FailWrites, 1);
    for i in 0..50 {
        s.create(&format!("s{i}"), None, BTreeMap::new(), None)
            .unwrap();
    }
    let before = read_all(&s, "origin");
    s.write_origin(0, &vec![0xab; 256 * chunk as usize], false)
        .unwrap();
    // 256 chunks overwritten, 50 snapshots: 256 copies, not 12,800.
    assert_eq!(s.used_chunks().unwrap(), 256);
    // Written twice more: no new copies.
    s.write_origin(0, &vec![0xcd; 256 * chunk as usize], false)
        .unwrap();
    assert_eq!(s.used_chunks().unwrap(), 256);
    for i in 0..50 {
        assert!(read_all(&s, &format!("s{i}")) == before);
    }
    // All 50 share the 256 copies: none holds them alone...
    assert!(s.snapshots().all(|x| x.exclusive_chunks == 0));
    // ...until only one is left.
    let names: Vec<String> = (0..49).map(|i| format!("s{i}")).collect();
    assert_eq!(s.delete(&names).unwrap(), 0);
    assert_eq!(s.snapshot("s49").unwrap().exclusive_chunks, 256);
    assert_eq!(s.delete(&["s49".to_string()]).unwrap(), 256 * chunk);
    assert_eq!(s.used_chunks().unwrap(), 0);
}

#[test]
fn a_sequential_write_is_recorded_as_few_extents() {
    let chunk = 4096;
    let (mut s, _o, _d) = mem_store(1024 * chunk, 16 << 20, chunk, OnFull::FailWrites, 2);
    s.create("a", None, BTreeMap::new(), None).unwrap();
    s.write_origin(0, &vec![1; 1024 * chunk as usize], false)
        .unwrap();
    let rep = s.check().unwrap();
    // 1024 chunks in groups of 128: 8 records, not 1024.
    assert_eq!(rep.records, 8, "{rep:?}");
    assert_eq!(rep.used_chunks, 1024);
}

fn fill_until_full(policy: OnFull) -> (snapctl::store::Store, Vec<u8>, Result<(), snapctl::Error>) {
    let chunk = 4096;
    // Origin of 2048 chunks; store with room for about 1000 copies.
    let store_size = (1 << 20) + META + 1000 * chunk;
    let (mut s, _o, _d) = mem_store(2048 * chunk, store_size, chunk, policy, 3);
    s.create("old", None, BTreeMap::new(), None).unwrap();
    let img_old = read_all(&s, "origin");
    s.write_origin(0, &vec![1; 600 * chunk as usize], false)
        .unwrap();
    s.create("new", None, BTreeMap::new(), None).unwrap();
    // The same 600 chunks again: "new" needs 600 copies, "old" already has its own.
    let r = s.write_origin(0, &vec![2; 600 * chunk as usize], false);
    (s, img_old, r)
}

#[test]
fn full_store_with_drop_oldest_deletes_the_oldest_and_the_write_succeeds() {
    let (mut s, _old, r) = fill_until_full(OnFull::DropOldest);
    r.unwrap();
    assert!(s.snapshot("old").is_err(), "oldest snapshot should be gone");
    assert!(s
        .events
        .iter()
        .any(|e| e.snapshot == "old" && e.action == "deleted"));
    let rep = s.check().unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    // "new" holds exactly what the origin had before the second write.
    let img = read_all(&s, "new");
    assert!(img[..600 * 4096].iter().all(|&b| b == 1));
}

#[test]
fn full_store_with_invalidate_marks_the_snapshot_invalid_and_it_refuses_reads() {
    let (mut s, img_old, r) = fill_until_full(OnFull::Invalidate);
    r.unwrap();
    let new = s.snapshot("new").unwrap();
    assert_eq!(new.state, SnapState::Invalid);
    let mut b = [0u8; 16];
    let err = s.read_view("new", 0, &mut b).unwrap_err();
    assert_eq!(err.kind(), "snapshot-invalid");
    // The older snapshot that still fits stays exact.
    assert_eq!(s.snapshot("old").unwrap().state, SnapState::Valid);
    assert!(read_all(&s, "old") == img_old);
    assert!(s.check().unwrap().is_clean());
}

#[test]
fn full_store_with_fail_writes_fails_the_write_and_changes_nothing() {
    let (mut s, img_old, r) = fill_until_full(OnFull::FailWrites);
    let err = r.unwrap_err();
    assert_eq!(err.kind(), "no-space");
    assert_eq!(err.errno(), libc::ENOSPC);
    let origin = read_all(&s, "origin");
    // The failed write did not reach the origin.
    assert!(origin[..600 * 4096].iter().all(|&b| b == 1));
    assert!(read_all(&s, "new") == origin);
    assert!(read_all(&s, "old") == img_old);
    assert!(s.check().unwrap().is_clean());
}

/// Bytes read from the store by open + create + list, on a store whose exception index holds
/// `records` scattered records.
fn catalog_cost(scatter_writes: usize) -> (u64, u64) {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    let chunk = 4096;
    let (mut s, origin, dev) = mem_store(16384 * chunk, 128 << 20, chunk, OnFull::FailWrites, 9);
    let mut rng = SmallRng::seed_from_u64(9);
    for i in 0..20 {
        s.create(&format!("s{i}"), None, BTreeMap::new(), None)
            .unwrap();
        for _ in 0..scatter_writes / 20 {
            let c = rng.gen_range(0..16384u64);
            s.write_origin(c * chunk, &[i as u8; 4096], false).unwrap();
        }
    }
    let rep = s.check().unwrap();
    let records = rep.records;
    if scatter_writes > 0 {
        assert!(
            rep.used_chunks > 10_000,
            "only {} chunks saved",
            rep.used_chunks
        );
    }
    drop(s);
    let counting = Arc::new(Counting {
        inner: dev.clone(),
        read: Default::default(),
    });
    let io: Arc<dyn snapctl::io::BlockIo> = counting.clone();
    let mut s = snapctl::store::Store::open_io(io, origin.clone(), "count").unwrap();
    s.create("new", None, BTreeMap::new(), None).unwrap();
    assert_eq!(s.snapshots().count(), 21);
    (counting.read.load(Ordering::SeqCst), records)
}

#[test]
fn create_and_list_do_not_read_the_exception_index() {
    let (empty_cost, r0) = catalog_cost(0);
    let (full_cost, r1) = catalog_cost(20_000);
    assert_eq!(r0, 0);
    assert!(r1 > 2_000, "only {r1} records");
    // The index holds megabytes; open + create + list read the same few pages either way.
    assert!(
        full_cost <= empty_cost + (64 << 10),
        "open+create+list read {full_cost} bytes with {r1} records, {empty_cost} with none"
    );
}

/// A first write's records reach the metadata without a durable commit: the copy journal holds
/// them. A process that dies without closing the store (here: the store is leaked, never
/// dropped) leaves them only in the journal; the next open replays them, and the open after
/// that (whose predecessor closed cleanly) finds nothing left to replay, so nothing is applied
/// twice. Without the replay the snapshot would read the origin's new bytes.
#[test]
fn journaled_writes_survive_a_process_that_never_closed_the_store() {
    let chunk = 4096;
    let (mut s, origin, dev) = mem_store(256 * chunk, 32 << 20, chunk, OnFull::FailWrites, 5);
    let at_a = read_all(&s, "origin");
    s.create("a", None, BTreeMap::new(), None).unwrap();
    for (i, c) in [3u64, 90, 91, 200, 17].iter().enumerate() {
        s.write_origin(c * chunk + 100, &[i as u8 + 1; 5000], false)
            .unwrap();
    }
    let now = read_all(&s, "origin");
    let journal = &dev.snapshot()[8192..8200];
    assert_eq!(journal, b"SNAPJRN\0", "the writes were not journaled");
    std::mem::forget(s);

    for round in 0..2 {
        let mut s = snapctl::store::Store::open_io(dev.clone(), origin.clone(), "mem").unwrap();
        assert!(
            read_all(&s, "a") == at_a,
            "round {round}: snapshot a differs"
        );
        assert!(
            read_all(&s, "origin") == now,
            "round {round}: origin differs"
        );
        let rep = s.check().unwrap();
        assert!(rep.is_clean(), "round {round}: {rep:?}");
        assert_eq!(rep.used_chunks, 9, "round {round}");
    }
}

fn queued(off: u64, len: usize, byte: u8) -> Vec<(u64, snapctl::io::AlignedBuf)> {
    let mut b = snapctl::io::AlignedBuf::new(len);
    b.as_mut_slice().fill(byte);
    vec![(off, b)]
}

/// Pipelined writes (store/writeback.rs): a queued write is read back before the queue is
/// written (the read waits for it); a queued write the origin then refuses stops the queue for
/// good: reading its range fails (never the old bytes), every later flush, write and change is
/// refused with a line naming the failed write, and snapshots still read exact.
#[test]
fn a_failed_queued_write_is_reported_and_stops_every_later_change() {
    let chunk = 4096;
    let (s, origin, dev) = mem_store(64 * chunk, 16 << 20, chunk, OnFull::FailWrites, 9);
    drop(s);
    let failing = Arc::new(Failing::new(as_io(&origin)));
    let mut s = snapctl::store::Store::open_io(as_io(&dev), failing.clone(), "mem").unwrap();
    s.pipeline_writes(false).unwrap();
    let at_a = read_all(&s, "origin");
    s.create("a", None, BTreeMap::new(), None).unwrap();

    let mut w = queued(3 * chunk + 10, 5000, 7);
    s.write_queued(&mut w, false).unwrap();
    assert!(w.is_empty(), "the queue took the buffer");
    assert_eq!(
        origin.snapshot()[3 * chunk as usize + 10],
        at_a[3 * chunk as usize + 10]
    );
    let mut b = vec![0u8; 5000];
    s.read_view("origin", 3 * chunk + 10, &mut b).unwrap();
    assert!(
        b.iter().all(|&x| x == 7),
        "a queued write was not read back"
    );
    assert_eq!(origin.snapshot()[3 * chunk as usize + 10], 7);

    failing
        .fail
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut w = queued(10 * chunk, 100, 9);
    s.write_queued(&mut w, false).unwrap();
    s.pump_writes();
    let lost = s.read_view("origin", 10 * chunk, &mut [0u8; 100]);
    assert!(
        lost.is_err(),
        "a lost write's range read as if nothing happened"
    );
    s.read_view("origin", 0, &mut [0u8; 100]).unwrap();
    let refusals = [
        s.flush().err(),
        s.write_queued(&mut queued(0, 10, 1), false).err(),
        s.write_origin(0, &[1; 10], false).err(),
        s.create("b", None, BTreeMap::new(), None).err(),
    ];
    for (i, e) in refusals.into_iter().enumerate() {
        let e = e.unwrap_or_else(|| panic!("refusal {i} did not happen"));
        let msg = e.to_string();
        assert!(
            msg.contains("a queued write failed") && msg.lines().count() == 1,
            "{msg}"
        );
    }
    assert!(read_all(&s, "a") == at_a, "snapshot a differs");
    assert_eq!(s.snapshots().count(), 1);
}
