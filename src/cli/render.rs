//! What a command prints: text for a terminal, one JSON document with `--json` (schema version
//! 1, described in snapctl(1)), nothing with `-q`. Fed only by typed values from
//! [`crate::ops`]; nothing here touches a store.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::names::{human_bytes, rfc3339};
use crate::ops::schedule::{Action, PeriodStatus, Pruned, Ran};
use crate::ops::StoreInfo;
use crate::store::cow::CheckReport;
use crate::store::{Event, SnapState, Snapshot};

/// How to print: `--json`, `-q`, or text.
#[derive(Clone, Copy)]
pub struct Style {
    pub json: bool,
    pub quiet: bool,
}

/// What a command prints, and its exit status.
pub struct Output {
    pub text: String,
    pub code: i32,
}

impl Output {
    fn ok(text: String) -> Output {
        Output { text, code: 0 }
    }
}

fn doc(v: Value) -> String {
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
    s.push('\n');
    s
}

impl Style {
    /// `v` (with the schema version added) under `--json`, nothing under `-q`, else `text()`.
    fn pick(self, v: Value, text: impl FnOnce() -> String) -> Output {
        if self.json {
            let mut o = serde_json::Map::new();
            o.insert("schema_version".into(), json!(1));
            if let Value::Object(m) = v {
                o.extend(m);
            }
            return Output::ok(doc(Value::Object(o)));
        }
        if self.quiet {
            return Output::ok(String::new());
        }
        Output::ok(text())
    }
}

/// A snapshot's JSON object.
pub fn snapshot_json(s: &Snapshot, chunk_size: u64) -> Value {
    serde_json::to_value(SnapshotDoc::of(s, chunk_size)).unwrap_or(Value::Null)
}

/// A snapshot as `--json` prints it, field by field in order (serialized straight to text for
/// `list`, where a map per snapshot costs more than the rest of the command).
#[derive(serde::Serialize)]
struct SnapshotDoc<'a> {
    name: &'a str,
    id: u64,
    parent: &'a str,
    created: String,
    writable: bool,
    expires: Option<String>,
    labels: &'a BTreeMap<String, String>,
    exclusive_bytes: u64,
    state: &'static str,
    invalid_reason: &'a Option<String>,
}

impl<'a> SnapshotDoc<'a> {
    fn of(s: &'a Snapshot, chunk_size: u64) -> Self {
        SnapshotDoc {
            name: &s.name,
            id: s.id,
            parent: &s.parent,
            created: rfc3339(s.created),
            writable: s.writable,
            expires: s.expires.map(rfc3339),
            labels: &s.labels,
            exclusive_bytes: s.owned_chunks() * chunk_size,
            state: match s.state {
                SnapState::Valid => "valid",
                SnapState::Invalid => "invalid",
            },
            invalid_reason: &s.invalid_reason,
        }
    }
}

/// A command that returns one snapshot: its JSON object, or `text`.
pub fn snapshot(st: Style, s: &Snapshot, cs: u64, text: String) -> Output {
    st.pick(json!({"snapshot": snapshot_json(s, cs)}), || text)
}

pub fn created(st: Style, s: &Snapshot, cs: u64) -> Output {
    let text = format!(
        "created snapshot '{}' of {} at {}\n",
        s.name,
        s.parent,
        rfc3339(s.created)
    );
    snapshot(st, s, cs, text)
}

/// `show`.
pub fn show(st: Style, s: &Snapshot, cs: u64) -> Output {
    snapshot(st, s, cs, snapshot_text(s, cs))
}

fn snapshot_text(s: &Snapshot, cs: u64) -> String {
    let labels = if s.labels.is_empty() {
        "-".to_string()
    } else {
        s.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut t = String::new();
    let mut line = |k: &str, v: String| t.push_str(&format!("{k:<16}{v}\n"));
    line("name:", s.name.clone());
    line("id:", s.id.to_string());
    line("parent:", s.parent.clone());
    line("created:", rfc3339(s.created));
    line("writable:", if s.writable { "yes" } else { "no" }.into());
    line(
        "expires:",
        s.expires.map(rfc3339).unwrap_or_else(|| "never".into()),
    );
    line("labels:", labels);
    line(
        "exclusive:",
        format!(
            "{} ({} bytes)",
            human_bytes(s.exclusive_chunks * cs),
            s.exclusive_chunks * cs
        ),
    );
    let state = match (&s.state, &s.invalid_reason) {
        (SnapState::Valid, _) => "valid".to_string(),
        (SnapState::Invalid, Some(r)) => format!("INVALID ({r})"),
        (SnapState::Invalid, None) => "INVALID".to_string(),
    };
    line("state:", state);
    t
}

/// `list` and `list --tree`.
pub fn list(st: Style, store: &str, cs: u64, snaps: &[Snapshot], tree: bool) -> Output {
    if st.json {
        // Straight to text: at 100,000 snapshots a JSON map per snapshot is most of the work.
        #[derive(serde::Serialize)]
        struct ListDoc<'a> {
            schema_version: u32,
            snapshots: Vec<SnapshotDoc<'a>>,
        }
        let d = ListDoc {
            schema_version: 1,
            snapshots: snaps.iter().map(|s| SnapshotDoc::of(s, cs)).collect(),
        };
        let mut t = serde_json::to_string_pretty(&d).unwrap_or_default();
        t.push('\n');
        return Output::ok(t);
    }
    st.pick(Value::Null, || {
        if snaps.is_empty() {
            format!("no snapshots in {store} (take one with `snapctl create NAME`)\n")
        } else if tree {
            snapshot_tree(snaps)
        } else {
            list_table(snaps, cs)
        }
    })
}

/// A table without borders, left-aligned, two spaces between columns, no trailing spaces.
/// Written out rather than built with a table crate: `list` prints one row per snapshot, and at
/// 100,000 snapshots a general table (a cell object per value, wrapping and styling passes)
/// cost seconds and hundreds of MiB; this is one pass for the widths and one for the text.
fn table(header: Vec<&str>, rows: Vec<Vec<String>>) -> String {
    use unicode_width::UnicodeWidthStr;
    let mut widths: Vec<usize> = header.iter().map(|h| h.width()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.width());
        }
    }
    let mut t = String::with_capacity((rows.len() + 1) * (widths.iter().sum::<usize>() + 16));
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let start = t.len();
        for (i, (c, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                t.push_str("  ");
            }
            t.push_str(c);
            t.extend(std::iter::repeat_n(' ', w.saturating_sub(c.width())));
        }
        let end = t[start..].trim_end().len() + start;
        t.truncate(end);
        t.push('\n');
    };
    line(&mut header.iter().copied());
    for r in &rows {
        line(&mut r.iter().map(String::as_str));
    }
    t
}

fn list_table(snaps: &[Snapshot], cs: u64) -> String {
    let rows = snaps
        .iter()
        .map(|s| {
            let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            vec![
                s.name.clone(),
                rfc3339(s.created),
                match s.state {
                    SnapState::Valid => "valid".into(),
                    SnapState::Invalid => "INVALID".to_string(),
                },
                if s.writable { "rw" } else { "ro" }.to_string(),
                human_bytes(s.owned_chunks() * cs),
                s.expires.map(rfc3339).unwrap_or_else(|| "-".into()),
                if labels.is_empty() {
                    "-".into()
                } else {
                    labels.join(",")
                },
            ]
        })
        .collect();
    table(
        vec![
            "NAME",
            "CREATED",
            "STATE",
            "MODE",
            "EXCLUSIVE",
            "EXPIRES",
            "LABELS",
        ],
        rows,
    )
}

/// `list --tree`: each snapshot under the view it was taken from.
fn snapshot_tree(snaps: &[Snapshot]) -> String {
    let names: std::collections::HashSet<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
    // parent name -> children, in creation order; a deleted parent's children hang off origin
    let mut kids: BTreeMap<&str, Vec<&Snapshot>> = BTreeMap::new();
    for s in snaps {
        let p = if names.contains(s.parent.as_str()) {
            s.parent.as_str()
        } else {
            "origin"
        };
        kids.entry(p).or_default().push(s);
    }
    fn walk(
        out: &mut String,
        node: &str,
        prefix: &str,
        kids: &BTreeMap<&str, Vec<&Snapshot>>,
        depth: usize,
    ) {
        let Some(list) = kids.get(node) else { return };
        for (i, s) in list.iter().enumerate() {
            let last = i + 1 == list.len();
            let mode = if s.writable { "rw" } else { "ro" };
            let state = if s.state == SnapState::Invalid {
                ", INVALID"
            } else {
                ""
            };
            let orphan = if node == "origin" && s.parent != "origin" {
                format!(", from deleted '{}'", s.parent)
            } else {
                String::new()
            };
            out.push_str(&format!(
                "{prefix}{}{} ({mode}, {}{state}{orphan})\n",
                if last { "└── " } else { "├── " },
                s.name,
                rfc3339(s.created)
            ));
            if depth < 64 && s.name != node {
                let p = format!("{prefix}{}", if last { "    " } else { "│   " });
                walk(out, &s.name, &p, kids, depth + 1);
            }
        }
    }
    let mut out = String::from("origin\n");
    walk(&mut out, "origin", "", &kids, 0);
    out
}

/// `info`.
pub fn info(st: Style, i: &StoreInfo) -> Output {
    let free = i.capacity_bytes - i.used_bytes.min(i.capacity_bytes);
    let v = json!({"store": {
        "format_version": i.format_version,
        "uuid": i.uuid,
        "store": i.store,
        "origin": i.origin,
        "origin_size": i.origin_size,
        "chunk_size": i.chunk_size,
        "capacity_bytes": i.capacity_bytes,
        "used_bytes": i.used_bytes,
        "free_bytes": free,
        "snapshot_count": i.snapshot_count,
        "on_full": i.on_full,
        "io_engine": i.io_engine,
        "events": i.events,
    }});
    st.pick(v, || {
        let mut t = String::new();
        let mut line = |k: &str, v: String| t.push_str(&format!("{k:<16}{v}\n"));
        line(
            "format:",
            format!("snapctl store, version {}", i.format_version),
        );
        line("uuid:", i.uuid.clone());
        line("store:", i.store.clone());
        line(
            "origin:",
            format!(
                "{} ({}, {} bytes)",
                i.origin,
                human_bytes(i.origin_size),
                i.origin_size
            ),
        );
        line("chunk size:", human_bytes(i.chunk_size));
        line(
            "capacity:",
            format!(
                "{} ({} bytes)",
                human_bytes(i.capacity_bytes),
                i.capacity_bytes
            ),
        );
        let pct = if i.capacity_bytes > 0 {
            i.used_bytes as f64 * 100.0 / i.capacity_bytes as f64
        } else {
            0.0
        };
        line(
            "used:",
            format!("{} ({pct:.1}%)", human_bytes(i.used_bytes)),
        );
        line("free:", human_bytes(free));
        line("snapshots:", i.snapshot_count.to_string());
        line("on full:", i.on_full.clone());
        line("I/O engine:", i.io_engine.clone());
        for ev in &i.events {
            line(
                "event:",
                format!(
                    "{} {} '{}': {}",
                    rfc3339(ev.time),
                    ev.action,
                    ev.snapshot,
                    ev.reason
                ),
            );
        }
        t
    })
}

/// `init`.
pub fn init(st: Style, sb: &crate::store::format::Superblock, store: &str) -> Output {
    let cap = sb.data_chunks * sb.chunk_size;
    let v = json!({"store": {
        "uuid": sb.uuid_string(), "store": store,
        "origin": sb.origin_path, "origin_size": sb.origin_size,
        "chunk_size": sb.chunk_size, "capacity_bytes": cap,
        "on_full": sb.on_full.name(),
    }});
    st.pick(v, || {
        format!(
            "initialized {store} as the store of {} ({} origin, {} chunks, {} for copies, on-full {})\n",
            sb.origin_path,
            human_bytes(sb.origin_size),
            human_bytes(sb.chunk_size),
            human_bytes(cap),
            sb.on_full.name()
        )
    })
}

pub fn deleted(st: Style, names: &[String], freed: u64) -> Output {
    st.pick(json!({"deleted": names, "freed_bytes": freed}), || {
        let list = names
            .iter()
            .map(|n| format!("'{n}'"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "deleted {list}, freed {} ({freed} bytes)\n",
            human_bytes(freed)
        )
    })
}

/// `export`; to stdout it prints nothing (stdout holds the image).
pub fn exported(st: Style, name: &str, bytes: u64, output: Option<&str>) -> Output {
    let Some(out) = output else {
        return Output::ok(String::new());
    };
    st.pick(
        json!({"exported": name, "bytes": bytes, "output": out}),
        || format!("exported '{name}' ({}) to {out}\n", human_bytes(bytes)),
    )
}

/// `write`: into the origin, or into the writable snapshot `snapshot`.
pub fn written(st: Style, offset: u64, bytes: u64, snapshot: Option<&str>) -> Output {
    let v = json!({"written_bytes": bytes, "offset": offset, "snapshot": snapshot});
    st.pick(v, || {
        let into = match snapshot {
            Some(s) => format!("snapshot '{s}'"),
            None => "the origin".to_string(),
        };
        format!(
            "wrote {} ({bytes} bytes) to {into} at offset {offset}\n",
            human_bytes(bytes)
        )
    })
}

pub fn diff(st: Style, from: &str, to: &str, cs: u64, ranges: &[(u64, u64)]) -> Output {
    let changed: u64 = ranges.iter().map(|r| r.1).sum();
    let r: Vec<Value> = ranges
        .iter()
        .map(|(o, l)| json!({"offset": o, "length": l}))
        .collect();
    let v =
        json!({"from": from, "to": to, "chunk_size": cs, "ranges": r, "changed_bytes": changed});
    st.pick(v, || {
        let mut t = String::new();
        if !ranges.is_empty() {
            t.push_str(&format!("{:<16}{:<16}{}\n", "OFFSET", "LENGTH", "SIZE"));
            for (o, l) in ranges {
                t.push_str(&format!("{o:<16}{l:<16}{}\n", human_bytes(*l)));
            }
        }
        t.push_str(&format!(
            "{} changed in {} range{} between '{from}' and '{to}' (at {} granularity)\n",
            human_bytes(changed),
            ranges.len(),
            if ranges.len() == 1 { "" } else { "s" },
            human_bytes(cs)
        ));
        t
    })
}

pub fn restored(st: Style, name: &str, backup: Option<&str>, written: u64) -> Output {
    let v = json!({"restored": name, "backup": backup, "written_bytes": written});
    st.pick(v, || {
        let undo = match backup {
            Some(b) => {
                format!("; the previous state is snapshot '{b}' (undo with `snapctl restore {b}`)")
            }
            None => String::new(),
        };
        format!(
            "restored the origin to '{name}': wrote {} ({written} bytes){undo}\n",
            human_bytes(written)
        )
    })
}

pub fn restored_to(st: Style, name: &str, to: &str, written: u64) -> Output {
    let v = json!({"restored": name, "to": to, "backup": null, "written_bytes": written});
    st.pick(v, || {
        format!(
            "wrote '{name}' ({}) to {to}; the origin is unchanged\n",
            human_bytes(written)
        )
    })
}

pub fn resumed(st: Style, restore: Option<&str>) -> Output {
    st.pick(json!({ "resumed": restore }), || match restore {
        Some(t) => format!("finished the interrupted restore of '{t}'\n"),
        None => "no restore was interrupted; nothing to do\n".to_string(),
    })
}

/// `check`: exit 6 on corruption, 9 on leaks only, 10 when `--repair` mended everything.
pub fn check(st: Style, store: &str, rep: &CheckReport) -> Output {
    let code = if !rep.corruption.is_empty() {
        6
    } else if !rep.leaks.is_empty() {
        9
    } else if !rep.repaired.is_empty() {
        10
    } else {
        0
    };
    let mut v = serde_json::to_value(rep).unwrap_or(Value::Null);
    v["clean"] = json!(rep.is_clean());
    let mut out = st.pick(json!({ "check": v }), || {
        let plural = |n: u64, w: &str| format!("{n} {w}{}", if n == 1 { "" } else { "s" });
        let mut t = String::new();
        for r in &rep.repaired {
            t.push_str(&format!("repaired: {r}\n"));
        }
        t.push_str(&format!(
            "{}: {}, {}, {} in use, {} free\n",
            store,
            plural(rep.snapshots, "snapshot"),
            plural(rep.records, "record"),
            plural(rep.used_chunks, "chunk"),
            plural(rep.free_chunks, "chunk"),
        ));
        if rep.data_checked {
            t.push_str(&format!(
                "{} read and verified against the checksums\n",
                plural(rep.chunks_verified, "saved chunk")
            ));
        }
        let mut lines = |what: &str, all: &[String]| {
            for c in all.iter().take(50) {
                t.push_str(&format!("{what}{c}\n"));
            }
            if all.len() > 50 {
                t.push_str(&format!("{what}... and {} more (--json lists all)\n", all.len() - 50));
            }
        };
        lines("CORRUPT: ", &rep.corruption);
        lines("leaked: ", &rep.leaks);
        lines("note: ", &rep.notes);
        t.push_str(match code {
            0 => "clean\n",
            9 => "leaked space found (no corruption, no snapshot is affected): `snapctl check --repair` frees it\n",
            10 => "repaired: the store is clean now\n",
            _ => "CORRUPTION found\n",
        });
        t
    });
    // `-q` still says nothing, but the status tells.
    out.code = code;
    out
}

pub fn upgraded(st: Style, path: &str, rep: &crate::store::upgrade::UpgradeReport) -> Output {
    st.pick(json!({ "upgrade": rep }), || {
        if rep.from_version == rep.to_version {
            return format!(
                "{path} is already in format version {}; nothing to do\n",
                rep.to_version
            );
        }
        format!(
            "upgraded {path} from format version {} to {}: {} snapshots, {} records, {} saved chunks hashed\n",
            rep.from_version, rep.to_version, rep.snapshots, rep.records, rep.chunks_hashed
        )
    })
}

/// What the store did on its own (the on-full policy), one line each on stderr.
pub fn events(st: Style, events: &[Event]) {
    if st.quiet {
        return;
    }
    for ev in events {
        eprintln!(
            "snapctl: {} snapshot '{}': {}",
            ev.action, ev.snapshot, ev.reason
        );
    }
}

pub fn pruned(st: Style, dry_run: bool, stores: &[Pruned]) -> Output {
    let v: Vec<Value> = stores
        .iter()
        .map(|p| json!({"store": p.store, "considered": p.considered, "deleted": p.deleted}))
        .collect();
    st.pick(json!({"dry_run": dry_run, "stores": v}), || {
        let mut text = String::new();
        for p in stores {
            for v in p.considered.iter().filter(|v| v.delete) {
                text.push_str(&format!(
                    "{}: {} '{}' ({})\n",
                    p.store,
                    if dry_run { "would delete" } else { "deleted" },
                    v.name,
                    v.rule
                ));
            }
        }
        if text.is_empty() {
            text = "nothing has expired\n".into();
        }
        text
    })
}

/// `schedule run`: exit 1 when a snapshot could not be taken.
pub fn schedule_ran(st: Style, dry_run: bool, now: i64, stores: &[Ran]) -> Output {
    let code = if stores.iter().any(|r| r.failed()) {
        1
    } else {
        0
    };
    let reports: Vec<Value> = stores
        .iter()
        .map(|r| {
            let (mut created, mut deleted, mut errors) = (vec![], vec![], vec![]);
            for a in &r.actions {
                match a {
                    Action::Take { name, period } => {
                        created.push(json!({"name": name, "period": period}))
                    }
                    Action::Delete { name, reason } => {
                        deleted.push(json!({"name": name, "reason": reason}))
                    }
                    Action::Failed { period, error } => {
                        errors.push(json!({"period": period, "error": error}))
                    }
                }
            }
            json!({"store": r.store, "path": r.path.display().to_string(),
                "created": created, "deleted": deleted, "errors": errors})
        })
        .collect();
    let v = json!({"dry_run": dry_run, "now": rfc3339(now), "stores": reports});
    let mut out = st.pick(v, || {
        let mut text = String::new();
        for r in stores {
            for a in &r.actions {
                text.push_str(&match a {
                    Action::Take { name, period } => format!(
                        "{}: {} '{name}' (period {period})\n",
                        r.store,
                        if dry_run { "would take" } else { "took" }
                    ),
                    Action::Failed { .. } => continue,
                    Action::Delete { name, reason } => format!(
                        "{}: {} '{name}' ({reason})\n",
                        r.store,
                        if dry_run { "would delete" } else { "deleted" }
                    ),
                });
            }
        }
        if text.is_empty() && code == 0 {
            text = "nothing due, nothing to delete\n".into();
        }
        text
    });
    // A failure is an error: on stderr like every other (cron mails it, `2>>log` keeps it), even
    // with -q; the JSON document carries it in "errors".
    if !st.json {
        for r in stores {
            for a in &r.actions {
                if let Action::Failed { period, error } = a {
                    eprintln!("snapctl: {}: period {period}: {error}", r.store);
                }
            }
        }
    }
    out.code = code;
    out
}

/// `schedule status`: exit 10 when a period is overdue.
pub fn schedule_status(st: Style, now: i64, rows: &[PeriodStatus]) -> Output {
    let code = if rows.iter().any(|r| r.overdue) {
        10
    } else {
        0
    };
    let v: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({"store": r.store, "period": r.period, "newest": r.newest,
                "newest_created": r.newest_created.map(rfc3339),
                "next_due": rfc3339(r.next_due), "overdue": r.overdue})
        })
        .collect();
    let mut out = st.pick(json!({"now": rfc3339(now), "periods": v}), || {
        table(
            vec!["STORE", "PERIOD", "NEWEST", "NEXT DUE", "STATE"],
            rows.iter()
                .map(|r| {
                    vec![
                        r.store.clone(),
                        r.period.clone(),
                        r.newest.clone().unwrap_or_else(|| "-".into()),
                        rfc3339(r.next_due),
                        if r.overdue { "OVERDUE" } else { "ok" }.to_string(),
                    ]
                })
                .collect(),
        )
    });
    out.code = code;
    out
}
