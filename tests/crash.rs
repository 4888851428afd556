//! Power loss after every single write, with the writes since the last flush lost, kept, partly
//! kept, or torn: the store must open at its last commit, `check` must find it clean, and every
//! snapshot must read exactly its point in time.

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::{rngs::SmallRng, Rng, SeedableRng};
use snapctl::io::testing::{CrashIo, MemIo, Power};
use snapctl::io::BlockIo;
use snapctl::store::format::OnFull;
use snapctl::store::Store;

const CHUNK: u64 = 4096;
const ORIGIN: u64 = 96 * CHUNK;
const STORE: u64 = (1 << 20) + (4 << 20) + 256 * CHUNK;

#[derive(Clone)]
enum Op {
    Restore(&'static str, Option<&'static str>),
    CreateWritable(&'static str),
    WriteSnap(&'static str, u64, usize, u8),
    CreateFrom(&'static str, &'static str),
    Create(&'static str),
    Delete(&'static str),
    Write(u64, usize, u8),
    Flush,
}

/// What the scenario promised so far.
#[derive(Default, Clone)]
struct Promised {
    /// Snapshots whose create returned, with their image.
    images: BTreeMap<String, Vec<u8>>,
    /// Snapshots whose delete returned.
    deleted: Vec<String>,
    /// Snapshots whose create or delete was under way at the cut: may or may not exist.
    uncertain: BTreeMap<String, Vec<u8>>,
    /// The origin as of the last completed flush, and which bytes were written since.
    durable_origin: Vec<u8>,
    dirty: Vec<bool>,
    /// A restore under way at the cut: the origin must be exactly one of these after reopening.
    restoring: Option<(Vec<u8>, Vec<u8>)>,
    /// Writable snapshots with writes not yet flushed: which of their bytes those writes cover
    /// (those may hold old or new bytes after a crash; every other byte must be exact).
    unflushed: BTreeMap<String, Vec<bool>>,
}

fn scenario(seed: u64) -> Vec<Op> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut w = |n: usize| -> Vec<Op> {
        (0..n)
            .map(|_| {
                let len = if rng.gen_bool(0.5) {
                    rng.gen_range(1..3 * CHUNK as usize)
                } else {
                    CHUNK as usize * rng.gen_range(1..12)
                };
                let off = rng.gen_range(0..ORIGIN - len as u64);
                Op::Write(off, len, rng.gen())
            })
            .collect()
    };
    let mut ops = vec![Op::Create("a")];
    ops.extend(w(3));
    ops.push(Op::Flush);
    ops.push(Op::Create("b"));
    ops.extend(w(3));
    ops.push(Op::Delete("a"));
    ops.extend(w(2));
    ops.push(Op::Flush);
    ops.push(Op::Create("c"));
    ops.extend(w(2));
    ops.extend(w(1));
    ops.push(Op::Restore("b", None));
    ops.extend(w(2));
    ops.push(Op::Restore("c", Some("bk")));
    ops.push(Op::Delete("b"));
    ops.push(Op::CreateWritable("w"));
    ops.push(Op::WriteSnap("w", 5000, 9000, 0x77));
    ops.push(Op::WriteSnap("w", 0, 4096, 0x78));
    ops.push(Op::Flush);
    ops.push(Op::CreateFrom("f", "w"));
    ops.push(Op::WriteSnap("w", 6000, 100, 0x79));
    ops.extend(w(2));
    ops.push(Op::Flush);
    ops.push(Op::Delete("w"));
    ops
}

fn base_images() -> (Vec<u8>, Vec<u8>) {
    let mut rng = SmallRng::seed_from_u64(42);
    let mut origin = vec![0u8; ORIGIN as usize];
    rng.fill(&mut origin[..]);
    let dev: Arc<MemIo> = Arc::new(MemIo::new(STORE));
    let d: Arc<dyn BlockIo> = dev.clone();
    Store::init_io(d, ORIGIN, CHUNK, 4 << 20, OnFull::FailWrites).unwrap();
    (origin, dev.snapshot())
}

/// Runs the scenario until power fails at write `cut` (None: never). Returns what was promised.
fn run(
    ops: &[Op],
    origin_img: &[u8],
    store_img: &[u8],
    cut: Option<u64>,
) -> (Arc<Power>, Arc<CrashIo>, Arc<CrashIo>, Promised, bool) {
    let power = Power::new();
    if let Some(n) = cut {
        power.cut_after(n);
    }
    let origin = Arc::new(CrashIo::new(origin_img.to_vec(), power.clone()));
    let store = Arc::new(CrashIo::new(store_img.to_vec(), power.clone()));
    let mut p = Promised {
        durable_origin: origin_img.to_vec(),
        dirty: vec![false; origin_img.len()],
        ..Default::default()
    };
    let mut model = origin_img.to_vec();
    let (o, s): (Arc<dyn BlockIo>, Arc<dyn BlockIo>) = (origin.clone(), store.clone());
    let mut st = match Store::open_io(s, o, "crash") {
        Ok(st) => st,
        Err(_) => return (power, origin, store, p, false),
    };
    for op in ops {
        match op {
            Op::Create(n) => {
                p.uncertain.insert(n.to_string(), model.clone());
                if st.create(n, None, BTreeMap::new(), None).is_err() {
                    return (power, origin, store, p, false);
                }
                p.uncertain.remove(*n);
                p.images.insert(n.to_string(), model.clone());
                // create flushed the origin
                p.durable_origin = model.clone();
                p.dirty.fill(false);
            }
            Op::Delete(n) => {
                let img = p.images.remove(*n).unwrap();
                p.uncertain.insert(n.to_string(), img);
                if st.delete(&[n.to_string()]).is_err() {
                    return (power, origin, store, p, false);
                }
                p.uncertain.remove(*n);
                p.deleted.push(n.to_string());
            }
            Op::Write(off, len, v) => {
                let (a, b) = (*off as usize, *off as usize + len);
                p.dirty[a..b].fill(true);
                if st.write_origin(*off, &vec![*v; *len], false).is_err() {
                    return (power, origin, store, p, false);
                }
                model[a..b].fill(*v);
            }
            Op::Restore(target, backup) => {
                let want = p.images[*target].clone();
                if let Some(b) = backup {
                    p.uncertain.insert(b.to_string(), model.clone());
                }
                p.restoring = Some((model.clone(), want.clone()));
                if st.restore(target, *backup, &mut |_, _| {}).is_err() {
                    return (power, origin, store, p, false);
                }
                p.restoring = None;
                if let Some(b) = backup {
                    p.uncertain.remove(*b);
                    p.images.insert(b.to_string(), model.clone());
                }
                model = want;
                p.durable_origin = model.clone();
                p.dirty.fill(false);
            }
            Op::CreateWritable(n) => {
                p.uncertain.insert(n.to_string(), model.clone());
                if st.create_writable(n, None, BTreeMap::new()).is_err() {
                    return (power, origin, store, p, false);
                }
                p.uncertain.remove(*n);
                p.images.insert(n.to_string(), model.clone());
                p.durable_origin = model.clone();
                p.dirty.fill(false);
            }
            Op::WriteSnap(n, off, len, v) => {
                let mask = p
                    .unflushed
                    .entry(n.to_string())
                    .or_insert_with(|| vec![false; ORIGIN as usize]);
                mask[*off as usize..*off as usize + len].fill(true);
                if st
                    .write_snapshot(n, &[(*off, &vec![*v; *len])], false)
                    .is_err()
                {
                    return (power, origin, store, p, false);
                }
                if let Some(img) = p.images.get_mut(*n) {
                    img[*off as usize..*off as usize + len].fill(*v);
                }
            }
            Op::CreateFrom(n, from) => {
                let img = p.images[*from].clone();
                p.uncertain.insert(n.to_string(), img.clone());
                if st
                    .create_from(n, from, None, BTreeMap::new(), false)
                    .is_err()
                {
                    return (power, origin, store, p, false);
                }
                p.uncertain.remove(*n);
                p.images.insert(n.to_string(), img);
            }
            Op::Flush => {
                if st.flush().is_err() {
                    return (power, origin, store, p, false);
                }
                p.durable_origin = model.clone();
                p.dirty.fill(false);
                p.unflushed.clear();
            }
        }
    }
    (power, origin, store, p, true)
}

fn verify(origin_img: Vec<u8>, store_img: Vec<u8>, p: &Promised, what: &str) {
    let origin: Arc<dyn BlockIo> = Arc::new(MemIo::from_vec(origin_img.clone()));
    let store: Arc<dyn BlockIo> = Arc::new(MemIo::from_vec(store_img));
    let mut st = Store::open_io(store, origin, "after-crash")
        .unwrap_or_else(|e| panic!("{what}: store does not open after the crash: {e}"));
    let rep = st.check().unwrap();
    assert!(rep.is_clean(), "{what}: check after crash: {rep:?}");
    // Mid-restore, the origin must be exactly the target once reopened (the restore resumed),
    // or untouched by it: then the rules for unflushed writes below apply as usual.
    let mut now = vec![0u8; ORIGIN as usize];
    st.read_view("origin", 0, &mut now).unwrap();
    let restored = p
        .restoring
        .as_ref()
        .is_some_and(|(_, target)| now == *target);
    if !restored {
        if let Some((pre, _)) = &p.restoring {
            for (i, (&got, &want)) in now.iter().zip(pre).enumerate() {
                assert!(
                    got == want || p.dirty[i] && got == p.durable_origin[i],
                    "{what}: the origin is half-restored after reopening (byte {i})"
                );
            }
        }
        for (i, (&got, &want)) in origin_img.iter().zip(&p.durable_origin).enumerate() {
            assert!(
                p.dirty[i] || got == want,
                "{what}: flushed origin byte {i} lost"
            );
        }
    }
    let present: Vec<String> = st.snapshots().map(|s| s.name.clone()).collect();
    for n in p.images.keys() {
        assert!(present.contains(n), "{what}: committed snapshot {n} lost");
    }
    for n in &p.deleted {
        assert!(
            !present.contains(n),
            "{what}: deleted snapshot {n} came back"
        );
    }
    for n in &present {
        if let Some(mask) = p.unflushed.get(n) {
            let want = &p.images[n];
            let mut got = vec![0u8; ORIGIN as usize];
            st.read_view(n, 0, &mut got).unwrap();
            for i in 0..got.len() {
                assert!(
                    mask[i] || got[i] == want[i],
                    "{what}: {n} byte {i} changed though no write covered it"
                );
            }
            continue;
        }
        let want = p
            .images
            .get(n)
            .or_else(|| p.uncertain.get(n))
            .unwrap_or_else(|| panic!("{what}: unknown snapshot {n}"));
        let mut got = vec![0u8; ORIGIN as usize];
        st.read_view(n, 0, &mut got).unwrap();
        assert!(
            got == *want,
            "{what}: snapshot {n} is not its point in time"
        );
    }
}

/// How many bytes of a pending write of n bytes reach the medium.
type Keep = Box<dyn Fn(&mut SmallRng, usize) -> usize>;

fn crash_everywhere(seed: u64) {
    let ops = scenario(seed);
    let (origin_img, store_img) = base_images();
    let (power, o, s, p, finished) = run(&ops, &origin_img, &store_img, None);
    assert!(finished);
    let total = power.writes();
    assert!(total > 20, "scenario too small: {total} writes");
    // Uncut run: everything promised is there.
    verify(o.current(), s.current(), &p, "uncut");
    let mut rng = SmallRng::seed_from_u64(seed);
    for cut in 0..total {
        // Late cuts fall in the clean close after the last operation: crash there too.
        let (_, o, s, p, _) = run(&ops, &origin_img, &store_img, Some(cut));
        let policies: [(&str, Keep); 4] = [
            ("lost", Box::new(|_, _| 0)),
            ("kept", Box::new(|_, n| n)),
            ("some", Box::new(|r, n| if r.gen_bool(0.5) { n } else { 0 })),
            ("torn", Box::new(|r, n| r.gen_range(0..=n))),
        ];
        for (name, keep) in policies.iter() {
            let mut r1 = SmallRng::seed_from_u64(rng.gen());
            let mut r2 = r1.clone();
            let oi = o.after_crash(|_, n| keep(&mut r1, n));
            let si = s.after_crash(|_, n| keep(&mut r2, n));
            verify(
                oi,
                si,
                &p,
                &format!("seed {seed} cut {cut}/{total} ({name})"),
            );
        }
        // The adversary: every pending write of the store reached the disk but one. This is
        // what catches a commit record that became durable before the data it points at.
        let pending = s.pending_writes();
        let mut drops: Vec<usize> = (0..pending).collect();
        if drops.len() > 6 {
            drops = (0..6).map(|_| rng.gen_range(0..pending)).collect();
        }
        for d in drops {
            let si = s.after_crash(|i, n| if i == d { 0 } else { n });
            verify(
                o.current(),
                si,
                &p,
                &format!("seed {seed} cut {cut}/{total} (all but store write {d} of {pending})"),
            );
        }
    }
}

#[test]
fn power_loss_after_any_write_leaves_every_snapshot_exact() {
    for seed in 0..3 {
        crash_everywhere(seed);
    }
}
