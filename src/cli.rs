//! Command line: arguments → typed requests → library calls → output. Never touches disk bytes.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::OnFull;
use crate::names::{human_bytes, parse_expiry, parse_size, rfc3339};
use crate::nbd::Shared;
use crate::store::{InitOptions, OpenOptions, SnapState, Snapshot, Store};

const AFTER_HELP: &str = "\
EXIT STATUS:
  0  success
  1  I/O error on a device or file
  2  invalid argument or input (nothing was changed)
  3  not found: no such snapshot, device or file, or not a snapctl store
  4  already exists
  5  busy: another snapctl holds the store, or a device is in use (mounted)
  6  corrupt metadata, or the origin is not the device the store was made for
  7  no space in the store
  8  the snapshot is invalid (dropped when the store filled up)
  9  check found leaked space but no corruption
 70  internal error

JSON OUTPUT (--json), schema_version 1:
  Every document is one object with \"schema_version\": 1, printed on stdout.
  A snapshot object: name, id (never reused), parent (\"origin\" or a snapshot name),
  created (RFC 3339, UTC), writable (bool), expires (RFC 3339 or null), labels (object
  of strings), exclusive_bytes (what deleting it alone would free), state (\"valid\" or
  \"invalid\"), invalid_reason (string or null).
  list   -> {\"schema_version\":1,\"snapshots\":[SNAPSHOT...]}
  show, create, rename -> {\"schema_version\":1,\"snapshot\":SNAPSHOT}
  info   -> {\"schema_version\":1,\"store\":{format_version, uuid, store, origin,
            origin_size, chunk_size, capacity_bytes, used_bytes, free_bytes,
            snapshot_count, on_full, io_engine, events}}
  delete -> {\"schema_version\":1,\"deleted\":[NAME...],\"freed_bytes\":N}
  diff   -> {\"schema_version\":1,\"from\":NAME,\"to\":NAME,\"chunk_size\":N,
            \"ranges\":[{\"offset\":N,\"length\":N}...],\"changed_bytes\":N}
  restore -> {\"schema_version\":1,\"restored\":NAME,\"backup\":NAME or null,
            \"written_bytes\":N} (with --to, also \"to\":DEVICE)
  export -> {\"schema_version\":1,\"exported\":NAME,\"bytes\":N,\"output\":PATH or null}
  write  -> {\"schema_version\":1,\"written_bytes\":N,\"offset\":N}
  check  -> {\"schema_version\":1,\"check\":{clean, data_checked, chunks_verified,
            damaged:[{snapshots:[NAME...], offset, length, store_chunk}...], snapshots,
            records, used_chunks, free_chunks, corruption:[...], leaks:[...]}}
  Errors -> {\"schema_version\":1,\"error\":{\"kind\":KIND,\"message\":TEXT}} on stderr, with
  KIND one of invalid-argument, not-found, already-exists, not-a-store, busy, corrupt,
  origin-mismatch, no-space, snapshot-invalid, io, internal.

ENVIRONMENT:
  SNAPCTL_STORE         the store, when -s is not given
  SNAPCTL_IO_ENGINE     uring, sync or auto (default auto: io_uring where the kernel allows)
  SNAPCTL_LOCK_TIMEOUT  seconds to wait for another snapctl on the same store (default 5)";

/// Point-in-time snapshots for any Linux block device.
///
/// The origin keeps its live data in place; a second device or file (the store) keeps the
/// copy-on-write exceptions. An origin write costs at most one chunk copy however many
/// snapshots exist. Writes to the origin must go through snapctl (`snapctl write`, or the
/// NBD server) for snapshots to stay exact.
#[derive(Parser, Debug)]
#[command(name = "snapctl", version, after_long_help = AFTER_HELP, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Args, Debug)]
pub struct Global {
    /// The exception store (a block device or a file)
    #[arg(
        short,
        long,
        env = "SNAPCTL_STORE",
        global = true,
        value_name = "STORE"
    )]
    pub store: Option<PathBuf>,
    /// Print one JSON object on stdout (errors as JSON on stderr)
    #[arg(long, global = true)]
    pub json: bool,
    /// Print nothing but errors
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Say more (which I/O engine is in use, what the store did on its own)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OnFullArg {
    /// Delete the oldest snapshots until the copy fits
    DropOldest,
    /// Mark the snapshots that need the copy invalid (they refuse reads)
    Invalidate,
    /// Fail the origin write with ENOSPC
    FailWrites,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Format STORE as the exception store of ORIGIN (never writes to ORIGIN)
    Init {
        /// The device or file to format (or -s)
        #[arg(value_name = "STORE")]
        target: Option<PathBuf>,
        /// The device (or file) whose snapshots to keep
        #[arg(long, value_name = "ORIGIN")]
        origin: PathBuf,
        /// Copy-on-write unit: a power of two from 4K to 1M (4096, 4K, 4KiB, 1M, 1MiB)
        #[arg(long, default_value = "4K", value_name = "SIZE")]
        chunk_size: String,
        /// What to do when the store has no room for a copy an origin write needs
        #[arg(long, value_enum, default_value = "drop-oldest")]
        on_full: OnFullArg,
        /// Metadata region size (default: 256 bytes per store chunk, at least 8 MiB)
        #[arg(long, value_name = "SIZE")]
        metadata_size: Option<String>,
        /// Overwrite a store that already holds snapctl data (its snapshots are lost)
        #[arg(long)]
        force: bool,
    },
    /// Show the store: format, sizes, space, policy, I/O engine
    Info,
    /// Take a read-only snapshot of the origin (instant: copies nothing)
    Create {
        /// Snapshot name: 1-128 of A-Z a-z 0-9 . _ - + : @ (not starting with '-' or '.')
        name: String,
        /// When it may be pruned: an RFC 3339 time or a duration (90m, 12h, 7d, 2w)
        #[arg(long, value_name = "WHEN")]
        expires: Option<String>,
        /// A KEY=VALUE label (repeatable)
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Snapshot this snapshot instead of the origin (its point in time, and what it holds
        /// if it is writable)
        #[arg(long, value_name = "SNAP")]
        from: Option<String>,
        /// Make the new snapshot writable (a clone); see set-writable
        #[arg(long)]
        writable: bool,
        /// Freeze this mounted file system while the snapshot is taken (repeatable)
        #[arg(long, value_name = "MOUNTPOINT")]
        freeze: Vec<PathBuf>,
        /// Thaw after this long whatever happens (a duration: 30s, 2m)
        #[arg(long, value_name = "DURATION", default_value = "30s")]
        freeze_timeout: String,
        /// Run this first (with /bin/sh -c); if it fails, no snapshot is taken
        #[arg(long, value_name = "CMD")]
        pre_hook: Option<String>,
        /// Run this after, whatever happened, once the pre-hook succeeded
        #[arg(long, value_name = "CMD")]
        post_hook: Option<String>,
        /// Stamp the snapshot with this creation time (RFC 3339) instead of now
        #[arg(long, value_name = "TIME", hide = true)]
        created_at: Option<String>,
    },
    /// Delete the snapshots past their expiry time
    Prune {
        /// Say what would be deleted, delete nothing
        #[arg(long)]
        dry_run: bool,
        /// Decide as if it were TIME (RFC 3339)
        #[arg(long, value_name = "TIME")]
        now: Option<String>,
        /// Configuration file naming stores (used when no store is given)
        #[arg(long, env = "SNAPCTL_CONFIG", default_value = crate::schedule::DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Scheduled snapshots with retention (for cron or a systemd timer)
    #[command(subcommand)]
    Schedule(ScheduleCmd),
    /// Make a read-only snapshot writable; one-way: there is no way back to read-only
    ///
    /// Snapshots taken of it while it was read-only keep their bytes. Writable snapshots are
    /// exported read-write by `snapctl serve`; writes to one change nothing else.
    SetWritable { name: String },
    /// List snapshots, oldest first
    #[command(visible_alias = "ls")]
    List {
        /// Show the genealogy: what each snapshot was taken from
        #[arg(long)]
        tree: bool,
    },
    /// Show one snapshot
    Show { name: String },
    /// Rename a snapshot
    Rename { old: String, new: String },
    /// Delete snapshots and free what only they held
    #[command(visible_alias = "rm")]
    Delete {
        #[arg(required = true)]
        names: Vec<String>,
        /// Delete even when an NBD client has the snapshot open (its reads then fail)
        #[arg(long)]
        force: bool,
    },
    /// Write the full image of a snapshot (or of `origin`) to FILE or stdout
    Export {
        /// A snapshot name, or `origin`
        name: String,
        /// Output file (default: stdout)
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Write data into the origin through copy-on-write (from FILE or stdin)
    Write {
        /// Byte offset in the origin
        #[arg(long, default_value = "0", value_name = "BYTES")]
        offset: String,
        /// Input file (default: stdin)
        #[arg(short, long, value_name = "FILE")]
        input: Option<PathBuf>,
        /// Write into this writable snapshot instead of the origin
        #[arg(long, value_name = "SNAP")]
        snapshot: Option<String>,
    },
    /// Convert a store written by an older snapctl (format 2) to this version, in place
    ///
    /// Adds a checksum to every saved chunk (each is read once) and to every metadata row, in
    /// one commit; a crash part way leaves the store as it was or converted, and running it
    /// again finishes. A store already in this format is left alone.
    Upgrade,
    /// Verify the store: checksums, single ownership of every chunk, space accounting
    ///
    /// Plain `check` reads the metadata only. `--data` also reads every saved chunk and
    /// verifies it against its checksum, naming each damaged snapshot and byte range.
    Check {
        /// Also read and verify every saved chunk (time proportional to the space in use)
        #[arg(long)]
        data: bool,
    },
    /// The byte ranges where two views differ, from metadata (TO defaults to origin)
    ///
    /// Exact at chunk granularity and never missing a difference. A chunk written again with
    /// the bytes it already held counts as changed (after a restore, for instance).
    Diff {
        /// A snapshot name, or origin
        from: String,
        /// A snapshot name, or origin
        #[arg(default_value = "origin")]
        to: String,
    },
    /// Make the origin identical to a snapshot, writing only the chunks that differ
    ///
    /// Every other snapshot stays exact: the writes go through copy-on-write. First a safety
    /// snapshot of the current origin is taken (pre-restore-TIME), so a restore can be undone;
    /// --no-backup skips it. A restore is recorded before it starts: after a crash, the next
    /// command on the store finishes it. Refused while an NBD client has the origin open (a
    /// mounted filesystem would be corrupted under it) unless --force.
    Restore {
        /// The snapshot to restore
        #[arg(required_unless_present = "resume")]
        name: Option<String>,
        /// Do not take a safety snapshot first
        #[arg(long)]
        no_backup: bool,
        /// Restore even while an NBD client has the origin open
        #[arg(long)]
        force: bool,
        /// Write the snapshot's full image to DEVICE (a device or file at least the origin's
        /// size) instead, leaving the origin alone
        #[arg(long, value_name = "DEVICE", conflicts_with_all = ["no_backup", "resume"])]
        to: Option<PathBuf>,
        /// Finish a restore that a crash interrupted (any command on the store does)
        #[arg(long, conflicts_with = "no_backup")]
        resume: bool,
    },
    /// Serve the origin and every snapshot over NBD, in the foreground
    ///
    /// Exports: `origin` (also the default export "") is the live origin, read-write, with
    /// writes going through copy-on-write; every snapshot is exported read-only under its name.
    /// Listens on a unix socket (default $SNAPCTL_RUN_DIR/UUID.sock, SNAPCTL_RUN_DIR defaulting
    /// to /run/snapctl, UUID being the store's) and on TCP only with --listen. While it runs,
    /// every other snapctl command on the store is carried out by the server through its control
    /// socket (UUID.ctl in the same directory), found from the store path. SIGTERM or SIGINT
    /// finish the requests in flight, commit, and exit 0.
    Serve {
        /// Unix socket for NBD clients
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Also listen on TCP: PORT or HOST:PORT (without a host, 127.0.0.1)
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
    },
    /// Generate man pages and shell completions (for packagers)
    #[command(hide = true)]
    GenerateDocs {
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum ScheduleCmd {
    /// Take each period's snapshot when due, then apply retention and expiry
    ///
    /// For every store in the configuration (or only --store's). A period is due on its
    /// boundaries in UTC (every = 1h: on the hour; 1d: at midnight; 1w: Monday midnight); after
    /// downtime one catch-up snapshot is taken, never a burst. Snapshots are named
    /// PERIOD-YYYYMMDDTHHMMSSZ after their boundary and labelled period=PERIOD; a second run in
    /// the same period does nothing. Retention deletes a period's snapshots beyond its keep
    /// and retain; snapshots without its label are never touched by it. Every snapshot past its
    /// expiry is deleted.
    Run {
        /// Say what would be done, do nothing
        #[arg(long)]
        dry_run: bool,
        /// Evaluate the schedule as if it were TIME (RFC 3339); snapshots are stamped with it
        #[arg(long, value_name = "TIME")]
        now: Option<String>,
        /// Configuration file
        #[arg(long, env = "SNAPCTL_CONFIG", default_value = crate::schedule::DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Each period's newest snapshot and next due time; exits 10 when one is overdue
    Status {
        /// Evaluate as if it were TIME (RFC 3339)
        #[arg(long, value_name = "TIME")]
        now: Option<String>,
        /// Configuration file
        #[arg(long, env = "SNAPCTL_CONFIG", default_value = crate::schedule::DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

/// Entry point: returns the process exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let json = cli.global.json;
    // A server holding the store carries the command out; otherwise it runs here.
    let forwardable = !matches!(
        cli.cmd,
        Cmd::Init { .. } | Cmd::Serve { .. } | Cmd::GenerateDocs { .. }
    );
    if let (true, Some(store)) = (forwardable, cli.global.store.as_deref()) {
        let argv: Vec<String> = std::env::args().collect();
        match crate::serve::forward(store, &argv) {
            Some(Ok(reply)) => {
                let out = Output {
                    text: reply.stdout,
                    code: reply.code,
                };
                if let Some((kind, msg)) = reply.error {
                    report(json, &kind, &msg);
                    return reply.code;
                }
                return emit(&out);
            }
            Some(Err(e)) => {
                report(json, e.kind(), &e.to_string());
                return e.exit_code();
            }
            None => {}
        }
    }
    std::panic::set_hook(Box::new(|_| {}));
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli)));
    let _ = std::panic::take_hook();
    match res {
        Ok(Ok(out)) => emit(&out),
        // `snapctl export origin | cmp -s - x`: a reader that stops early is not an error.
        Ok(Err(Error::Io { source, .. })) if source.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Ok(Err(e)) => {
            report(json, e.kind(), &e.to_string());
            e.exit_code()
        }
        Err(p) => {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            report(
                json,
                "internal",
                &format!("internal error ({what}); the store's metadata may be damaged: run `snapctl check`"),
            );
            70
        }
    }
}

fn report(json: bool, kind: &str, msg: &str) {
    if json {
        let v = json!({"schema_version": 1, "error": {"kind": kind, "message": msg}});
        eprintln!("{v}");
    } else {
        eprintln!("snapctl: {msg}");
    }
}

/// What a command prints, and its exit status.
pub struct Output {
    pub text: String,
    pub code: i32,
}

fn emit(out: &Output) -> i32 {
    let mut so = std::io::stdout().lock();
    match so.write_all(out.text.as_bytes()).and_then(|_| so.flush()) {
        Ok(()) => out.code,
        // `snapctl list | head`: a closed pipe is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => out.code,
        Err(e) => {
            eprintln!("snapctl: stdout: {e}");
            1
        }
    }
}

fn store_path(g: &Global) -> Result<&Path> {
    g.store
        .as_deref()
        .ok_or_else(|| Error::Invalid("no store given: pass -s STORE or set SNAPCTL_STORE".into()))
}

fn doc(v: Value) -> String {
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
    s.push('\n');
    s
}

fn ok(text: String) -> Result<Output> {
    Ok(Output { text, code: 0 })
}

pub fn snapshot_json(s: &Snapshot, chunk_size: u64) -> Value {
    json!({
        "name": s.name,
        "id": s.id,
        "parent": s.parent,
        "created": rfc3339(s.created),
        "writable": s.writable,
        "expires": s.expires.map(rfc3339),
        "labels": s.labels,
        "exclusive_bytes": s.owned_chunks() * chunk_size,
        "state": match s.state { SnapState::Valid => "valid", SnapState::Invalid => "invalid" },
        "invalid_reason": s.invalid_reason,
    })
}

/// `list --tree`: each snapshot under the view it was taken from.
fn snapshot_tree(snaps: Vec<&Snapshot>) -> String {
    let names: std::collections::HashSet<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
    // parent name -> children, in creation order; a deleted parent's children hang off origin
    let mut kids: BTreeMap<&str, Vec<&Snapshot>> = BTreeMap::new();
    for s in &snaps {
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

/// The reply of a command that returns one snapshot: its JSON object, nothing with -q, or `text`.
fn snapshot_output(g: &Global, s: &Snapshot, cs: u64, text: String) -> Result<Output> {
    if g.json {
        return ok(doc(
            json!({"schema_version": 1, "snapshot": snapshot_json(s, cs)}),
        ));
    }
    if g.quiet {
        return ok(String::new());
    }
    ok(text)
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

/// Where a command runs: in this process on a store it opens, or inside a running server
/// (forwarded through the control socket) on the server's store.
#[derive(Default)]
pub struct Ctx {
    pub shared: Option<Arc<Shared>>,
    /// The client's working directory, for relative paths.
    pub cwd: Option<PathBuf>,
    pub stdin: Option<std::fs::File>,
    pub stdout: Option<std::fs::File>,
}

impl Ctx {
    fn path(&self, p: &Path) -> PathBuf {
        match &self.cwd {
            Some(c) if p.is_relative() => c.join(p),
            _ => p.to_path_buf(),
        }
    }
}

/// A store a command works on: opened here, or the server's, locked.
enum StoreGuard<'a> {
    Own(Box<Store>),
    Locked(std::sync::MutexGuard<'a, Store>),
}

impl std::ops::Deref for StoreGuard<'_> {
    type Target = Store;
    fn deref(&self) -> &Store {
        match self {
            StoreGuard::Own(s) => s,
            StoreGuard::Locked(s) => s,
        }
    }
}

impl std::ops::DerefMut for StoreGuard<'_> {
    fn deref_mut(&mut self) -> &mut Store {
        match self {
            StoreGuard::Own(s) => s,
            StoreGuard::Locked(s) => s,
        }
    }
}

/// How a command uses the origin.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Reads only (info, list, show, export, check).
    Read,
    /// Changes snapshots: the origin must not be mounted behind snapctl's back.
    Change,
    /// Writes the origin.
    Write,
}

fn open<'a>(g: &Global, how: Use, ctx: &'a Ctx) -> Result<StoreGuard<'a>> {
    if let Some(sh) = &ctx.shared {
        return Ok(StoreGuard::Locked(sh.lock()?));
    }
    let path = store_path(g)?;
    let store = Store::open(
        path,
        OpenOptions {
            write_origin: how == Use::Write,
            exclusive_origin: how != Use::Read,
            ..OpenOptions::default()
        },
    )?;
    if g.verbose > 0 && !g.json {
        eprintln!(
            "snapctl: store {} uses the {} engine; origin {} uses {}",
            path.display(),
            store.engine(),
            store.sb.origin_path,
            store.origin_engine()
        );
    }
    Ok(StoreGuard::Own(Box::new(store)))
}

/// Logs what the store did on its own (the on-full policy) to stderr.
fn log_events(store: &mut StoreGuard<'_>, g: &Global) {
    for ev in store.events.drain(..) {
        if !g.quiet {
            eprintln!(
                "snapctl: {} snapshot '{}': {}",
                ev.action, ev.snapshot, ev.reason
            );
        }
    }
}

fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for l in labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| Error::Invalid(format!("--label '{l}' is not KEY=VALUE")))?;
        let key_ok = !k.is_empty()
            && k.len() <= 64
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c));
        if !key_ok {
            return Err(Error::Invalid(format!(
                "--label key '{k}' must be 1-64 characters of A-Z a-z 0-9 . _ - /"
            )));
        }
        if v.len() > 256 || v.chars().any(|c| c.is_control()) {
            return Err(Error::Invalid(format!(
                "--label value for '{k}' must be at most 256 printable characters"
            )));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(Error::Invalid(format!("--label '{k}' is given twice")));
        }
    }
    Ok(out)
}

fn progress(g: &Global, ctx: &Ctx, total: u64, what: &str) -> indicatif::ProgressBar {
    if g.quiet || ctx.shared.is_some() || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

pub fn run(cli: Cli) -> Result<Output> {
    run_ctx(cli, &Ctx::default())
}

pub fn run_ctx(cli: Cli, ctx: &Ctx) -> Result<Output> {
    let g = &cli.global;
    match &cli.cmd {
        Cmd::Init {
            target,
            origin,
            chunk_size,
            on_full,
            metadata_size,
            force,
        } => {
            let path = match target {
                Some(t) => t.as_path(),
                None => store_path(g)?,
            };
            let chunk_size = parse_size(chunk_size).map_err(|_| {
                Error::Invalid(format!(
                    "--chunk-size '{chunk_size}' is not a size; use a power of two from 4K to 1M"
                ))
            })?;
            let metadata_size = metadata_size.as_deref().map(parse_size).transpose()?;
            let on_full = match on_full {
                OnFullArg::DropOldest => OnFull::DropOldest,
                OnFullArg::Invalidate => OnFull::Invalidate,
                OnFullArg::FailWrites => OnFull::FailWrites,
            };
            let sb = Store::init(
                path,
                origin,
                &InitOptions {
                    chunk_size,
                    on_full,
                    force: *force,
                    metadata_size,
                },
            )?;
            let cap = sb.data_chunks * sb.chunk_size;
            if g.json {
                return ok(doc(json!({"schema_version": 1, "store": {
                    "uuid": sb.uuid_string(), "store": path.display().to_string(),
                    "origin": sb.origin_path, "origin_size": sb.origin_size,
                    "chunk_size": sb.chunk_size, "capacity_bytes": cap,
                    "on_full": on_full.name(),
                }})));
            }
            if g.quiet {
                return ok(String::new());
            }
            ok(format!(
                "initialized {} as the store of {} ({} origin, {} chunks, {} for copies, on-full {})\n",
                path.display(),
                sb.origin_path,
                human_bytes(sb.origin_size),
                human_bytes(sb.chunk_size),
                human_bytes(cap),
                on_full.name()
            ))
        }
        Cmd::Info => {
            let store = open(g, Use::Read, ctx)?;
            let sb = &store.sb;
            let cap = sb.data_chunks * sb.chunk_size;
            let used = store.used_chunks()? * sb.chunk_size;
            let events = store.recent_events(10)?;
            let count = store.snapshots().count();
            if g.json {
                return ok(doc(json!({"schema_version": 1, "store": {
                    "format_version": crate::format::FORMAT_VERSION,
                    "uuid": sb.uuid_string(),
                    "store": store.name,
                    "origin": sb.origin_path,
                    "origin_size": sb.origin_size,
                    "chunk_size": sb.chunk_size,
                    "capacity_bytes": cap,
                    "used_bytes": used,
                    "free_bytes": cap - used.min(cap),
                    "snapshot_count": count,
                    "on_full": sb.on_full.name(),
                    "io_engine": store.engine(),
                    "events": events,
                }})));
            }
            let mut t = String::new();
            let mut line = |k: &str, v: String| t.push_str(&format!("{k:<16}{v}\n"));
            line(
                "format:",
                format!("snapctl store, version {}", crate::format::FORMAT_VERSION),
            );
            line("uuid:", sb.uuid_string());
            line("store:", store.name.clone());
            line(
                "origin:",
                format!(
                    "{} ({}, {} bytes)",
                    sb.origin_path,
                    human_bytes(sb.origin_size),
                    sb.origin_size
                ),
            );
            line("chunk size:", human_bytes(sb.chunk_size));
            line("capacity:", format!("{} ({} bytes)", human_bytes(cap), cap));
            let pct = if cap > 0 {
                used as f64 * 100.0 / cap as f64
            } else {
                0.0
            };
            line("used:", format!("{} ({pct:.1}%)", human_bytes(used)));
            line("free:", human_bytes(cap - used.min(cap)));
            line("snapshots:", count.to_string());
            line("on full:", sb.on_full.name().into());
            line("I/O engine:", store.engine().into());
            for ev in events {
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
            ok(t)
        }
        Cmd::Create {
            name,
            expires,
            labels,
            from,
            writable,
            freeze,
            freeze_timeout,
            pre_hook,
            post_hook,
            created_at,
        } if !freeze.is_empty() || pre_hook.is_some() || post_hook.is_some() => {
            let timeout = crate::names::parse_duration(freeze_timeout).ok_or_else(|| {
                Error::Invalid(format!(
                    "--freeze-timeout '{freeze_timeout}' is not a duration (30s, 2m)"
                ))
            })?;
            let mut args = vec!["create".to_string(), name.clone()];
            if let Some(e) = expires {
                args.extend(["--expires".into(), e.clone()]);
            }
            for l in labels {
                args.extend(["--label".into(), l.clone()]);
            }
            if let Some(f) = from {
                args.extend(["--from".into(), f.clone()]);
            }
            if *writable {
                args.push("--writable".into());
            }
            if let Some(c) = created_at {
                args.extend(["--created-at".into(), c.clone()]);
            }
            let store = store_path(g)?.to_path_buf();
            let v = consistent_create(
                &store,
                &args,
                freeze,
                timeout,
                pre_hook.as_deref(),
                post_hook.as_deref(),
                g.quiet,
            )?;
            let snap = &v["snapshot"];
            if g.json {
                return ok(doc(v.clone()));
            }
            if g.quiet {
                return ok(String::new());
            }
            ok(format!(
                "created snapshot '{}' of {} at {}\n",
                snap["name"].as_str().unwrap_or(name),
                snap["parent"].as_str().unwrap_or("origin"),
                snap["created"].as_str().unwrap_or("")
            ))
        }
        Cmd::Prune {
            dry_run,
            now,
            config,
        } => {
            let now = parse_now(now.as_deref())?;
            let stores: Vec<PathBuf> = match &g.store {
                Some(s) => vec![s.clone()],
                None => load_config(config)?.into_iter().map(|s| s.path).collect(),
            };
            let mut out = Vec::new();
            let mut text = String::new();
            for st in stores {
                let snaps = list_infos(&st)?;
                let verdicts = crate::schedule::expiry(&snaps, now);
                let mut deleted = Vec::new();
                for v in verdicts.iter().filter(|v| v.delete) {
                    if !*dry_run && delete_quietly(&st, &v.name)? {
                        deleted.push(v.name.clone());
                    }
                    text.push_str(&format!(
                        "{}: {} '{}' ({})\n",
                        st.display(),
                        if *dry_run { "would delete" } else { "deleted" },
                        v.name,
                        v.rule
                    ));
                }
                out.push(json!({"store": st.display().to_string(), "considered": verdicts, "deleted": deleted}));
            }
            if g.json {
                return ok(doc(
                    json!({"schema_version": 1, "dry_run": dry_run, "stores": out}),
                ));
            }
            if g.quiet {
                return ok(String::new());
            }
            if text.is_empty() {
                text = "nothing has expired\n".into();
            }
            ok(text)
        }
        Cmd::Schedule(ScheduleCmd::Run {
            dry_run,
            now,
            config,
        }) => schedule_run(g, config, *dry_run, now.as_deref()),
        Cmd::Schedule(ScheduleCmd::Status { now, config }) => {
            schedule_status(g, config, now.as_deref())
        }
        Cmd::Create {
            name,
            expires,
            labels,
            from,
            writable,
            created_at,
            ..
        } => {
            crate::names::validate(name)?;
            let labels = parse_labels(labels)?;
            let now = chrono::Utc::now().timestamp();
            let expires = expires
                .as_deref()
                .map(|e| parse_expiry(e, now))
                .transpose()?;
            let mut store = open(g, Use::Change, ctx)?;
            let s = match from {
                Some(f) => store.create_from(name, f, expires, labels, *writable)?,
                None if *writable => store.create_writable(name, expires, labels)?,
                None => store.create(
                    name,
                    expires,
                    labels,
                    created_at
                        .as_deref()
                        .map(|t| parse_now(Some(t)))
                        .transpose()?,
                )?,
            };
            let text = format!(
                "created snapshot '{}' of {} at {}\n",
                s.name,
                s.parent,
                rfc3339(s.created)
            );
            snapshot_output(g, &s, store.sb.chunk_size, text)
        }
        Cmd::List { tree } => {
            let store = open(g, Use::Read, ctx)?;
            let cs = store.sb.chunk_size;
            if g.json {
                let v: Vec<Value> = store.snapshots().map(|s| snapshot_json(s, cs)).collect();
                return ok(doc(json!({"schema_version": 1, "snapshots": v})));
            }
            if g.quiet {
                return ok(String::new());
            }
            if store.snapshots().next().is_none() {
                return ok(format!(
                    "no snapshots in {} (take one with `snapctl create NAME`)\n",
                    store.name
                ));
            }
            if *tree {
                return ok(snapshot_tree(store.snapshots().collect()));
            }
            let mut table = comfy_table::Table::new();
            table.load_preset(comfy_table::presets::NOTHING);
            table.set_header(vec![
                "NAME",
                "CREATED",
                "STATE",
                "MODE",
                "EXCLUSIVE",
                "EXPIRES",
                "LABELS",
            ]);
            for s in store.snapshots() {
                let labels: Vec<String> =
                    s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                table.add_row(vec![
                    s.name.clone(),
                    rfc3339(s.created),
                    match s.state {
                        SnapState::Valid => "valid".into(),
                        SnapState::Invalid => "INVALID".to_string(),
                    },
                    if s.writable {
                        "rw".into()
                    } else {
                        "ro".to_string()
                    },
                    human_bytes(s.owned_chunks() * cs),
                    s.expires.map(rfc3339).unwrap_or_else(|| "-".into()),
                    if labels.is_empty() {
                        "-".into()
                    } else {
                        labels.join(",")
                    },
                ]);
            }
            let mut t = String::new();
            for l in table.to_string().lines() {
                t.push_str(l.strip_prefix(' ').unwrap_or(l).trim_end());
                t.push('\n');
            }
            ok(t)
        }
        Cmd::Show { name } => {
            let store = open(g, Use::Read, ctx)?;
            let s = store.snapshot(name)?;
            let cs = store.sb.chunk_size;
            if g.json {
                return ok(doc(
                    json!({"schema_version": 1, "snapshot": snapshot_json(s, cs)}),
                ));
            }
            ok(snapshot_text(s, cs))
        }
        Cmd::SetWritable { name } => {
            let mut store = open(g, Use::Change, ctx)?;
            let s = store.set_writable(name)?;
            let text = format!(
                "snapshot '{name}' is writable (one-way: it cannot become read-only again)\n"
            );
            snapshot_output(g, &s, store.sb.chunk_size, text)
        }
        Cmd::Rename { old, new } => {
            crate::names::validate(new)?;
            let mut store = open(g, Use::Change, ctx)?;
            let s = store.rename(old, new)?;
            snapshot_output(
                g,
                &s,
                store.sb.chunk_size,
                format!("renamed '{old}' to '{new}'\n"),
            )
        }
        Cmd::Delete { names, force } => {
            if let (Some(sh), false) = (&ctx.shared, force) {
                for n in names {
                    let open = sh.open_count(n);
                    if open > 0 {
                        return Err(Error::Busy(format!(
                            "snapshot '{n}' is open by {open} NBD client(s); disconnect them, or use --force"
                        )));
                    }
                }
            }
            let mut store = open(g, Use::Change, ctx)?;
            let freed = store.delete(names)?;
            if g.json {
                return ok(doc(
                    json!({"schema_version": 1, "deleted": names, "freed_bytes": freed}),
                ));
            }
            if g.quiet {
                return ok(String::new());
            }
            let list = names
                .iter()
                .map(|n| format!("'{n}'"))
                .collect::<Vec<_>>()
                .join(", ");
            ok(format!(
                "deleted {list}, freed {} ({freed} bytes)\n",
                human_bytes(freed)
            ))
        }
        Cmd::Export { name, output } => {
            let output = output.as_ref().map(|p| ctx.path(p));
            // A file is written whole or not at all: into a temporary file beside it, renamed
            // over it on success, removed on failure. Devices are written in place.
            let mut pending: Option<AtomicOutput> = None;
            let mut sink: Box<dyn Write> = match (&output, &ctx.stdout) {
                (Some(p), _) => {
                    let out = AtomicOutput::create(p)?;
                    let f = out
                        .file
                        .try_clone()
                        .map_err(|e| Error::io(format!("output {}", p.display()), e))?;
                    pending = Some(out);
                    Box::new(std::io::BufWriter::with_capacity(1 << 20, f))
                }
                (None, Some(f)) => {
                    if f.is_terminal() && !g.json {
                        return Err(Error::Invalid(
                            "refusing to write a disk image to a terminal; use -o FILE or redirect stdout".into(),
                        ));
                    }
                    Box::new(f.try_clone().map_err(|e| Error::io("stdout", e))?)
                }
                (None, None) => {
                    if std::io::stdout().is_terminal() && !g.json {
                        return Err(Error::Invalid(
                            "refusing to write a disk image to a terminal; use -o FILE or redirect stdout".into(),
                        ));
                    }
                    Box::new(std::io::stdout().lock())
                }
            };
            let total = stream_view(g, ctx, name, "export", &mut |_, data| {
                sink.write_all(data)
                    .map_err(|e| Error::io("export output", e))
            })?;
            sink.flush().map_err(|e| Error::io("export output", e))?;
            drop(sink);
            if let Some(out) = pending.take() {
                out.commit()?;
            }
            if output.is_none() {
                return ok(String::new()); // stdout holds the image
            }
            if g.json {
                return ok(doc(
                    json!({"schema_version": 1, "exported": name, "bytes": total,
                    "output": output.as_ref().map(|p| p.display().to_string())}),
                ));
            }
            if g.quiet {
                return ok(String::new());
            }
            ok(format!(
                "exported '{name}' ({}) to {}\n",
                human_bytes(total),
                output
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ))
        }
        Cmd::Diff { from, to } => {
            let store = open(g, Use::Read, ctx)?;
            let cs = store.sb.chunk_size;
            let size = store.sb.origin_size;
            let chunks = store.diff_chunks(from, to)?;
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for c in chunks {
                let (off, len) = (c * cs, cs.min(size - c * cs));
                match ranges.last_mut() {
                    Some((o, l)) if *o + *l == off => *l += len,
                    _ => ranges.push((off, len)),
                }
            }
            let changed: u64 = ranges.iter().map(|r| r.1).sum();
            if g.json {
                let r: Vec<Value> = ranges
                    .iter()
                    .map(|(o, l)| json!({"offset": o, "length": l}))
                    .collect();
                return ok(doc(
                    json!({"schema_version": 1, "from": from, "to": to, "chunk_size": cs,
                    "ranges": r, "changed_bytes": changed}),
                ));
            }
            if g.quiet {
                return ok(String::new());
            }
            let mut t = String::new();
            if !ranges.is_empty() {
                t.push_str(&format!("{:<16}{:<16}{}\n", "OFFSET", "LENGTH", "SIZE"));
                for (o, l) in &ranges {
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
            ok(t)
        }
        Cmd::Restore {
            name,
            no_backup,
            force,
            to,
            resume,
        } => {
            if let (Some(sh), false) = (&ctx.shared, force) {
                let open = sh.open_count("origin");
                if open > 0 && to.is_none() && !resume {
                    return Err(Error::Busy(format!(
                        "the origin is open by {open} NBD client(s): a mounted filesystem would be corrupted under a restore; disconnect them, or use --force"
                    )));
                }
            }
            if *resume {
                let store = open(g, Use::Write, ctx)?;
                let msg = match &store.resumed_restore {
                    Some(t) => format!("finished the interrupted restore of '{t}'\n"),
                    None => "no restore was interrupted; nothing to do\n".to_string(),
                };
                if g.json {
                    return ok(doc(
                        json!({"schema_version": 1, "resumed": store.resumed_restore}),
                    ));
                }
                return ok(if g.quiet { String::new() } else { msg });
            }
            let Some(name) = name else {
                return Err(Error::Invalid("restore needs a snapshot name".into()));
            };
            if let Some(dev) = to {
                return restore_to(g, ctx, name, &ctx.path(dev));
            }
            let mut store = open(g, Use::Write, ctx)?;
            store.snapshot(name)?;
            let backup = if *no_backup {
                None
            } else {
                let base = format!(
                    "pre-restore-{}",
                    chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
                );
                let mut b = base.clone();
                let mut k = 1;
                while store.snapshot(&b).is_ok() {
                    k += 1;
                    b = format!("{base}-{k}");
                }
                Some(b)
            };
            let pb = progress(g, ctx, 0, &format!("restore {name}"));
            let written = store.restore(name, backup.as_deref(), &mut |done, total| {
                pb.set_length(total);
                pb.set_position(done);
            })?;
            pb.finish_and_clear();
            log_events(&mut store, g);
            if g.json {
                return ok(doc(
                    json!({"schema_version": 1, "restored": name, "backup": backup,
                    "written_bytes": written}),
                ));
            }
            if g.quiet {
                return ok(String::new());
            }
            let undo = match &backup {
                Some(b) => format!(
                    "; the previous state is snapshot '{b}' (undo with `snapctl restore {b}`)"
                ),
                None => String::new(),
            };
            ok(format!(
                "restored the origin to '{name}': wrote {} ({written} bytes){undo}\n",
                human_bytes(written)
            ))
        }
        Cmd::Write {
            offset,
            input,
            snapshot,
        } => {
            let offset = parse_size(offset)
                .map_err(|_| Error::Invalid(format!("--offset '{offset}' is not a byte offset")))?;
            let input = input.as_ref().map(|p| ctx.path(p));
            let mut src: Box<dyn Read> = match (&input, &ctx.stdin) {
                (None, Some(f)) => Box::new(f.try_clone().map_err(|e| Error::io("stdin", e))?),
                (Some(p), _) => Box::new(std::fs::File::open(p).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        Error::NotFound(format!("input {}: no such file", p.display()))
                    }
                    _ => Error::io(format!("input {}", p.display()), e),
                })?),
                (None, None) => Box::new(std::io::stdin().lock()),
            };
            let mut store = open(
                g,
                if snapshot.is_some() {
                    Use::Change
                } else {
                    Use::Write
                },
                ctx,
            )?;
            if let Some(sn) = snapshot {
                let s = store.snapshot(sn)?;
                if !s.writable {
                    return Err(Error::Invalid(format!(
                        "snapshot '{sn}' is read-only; `snapctl set-writable {sn}` makes it writable"
                    )));
                }
            }
            if offset > store.sb.origin_size {
                return Err(Error::Invalid(format!(
                    "--offset {offset} is beyond the end of the origin ({} bytes)",
                    store.sb.origin_size
                )));
            }
            let mut buf = vec![0u8; 1 << 20];
            let mut pos = offset;
            let res = (|| -> Result<()> {
                loop {
                    let mut n = 0;
                    while n < buf.len() {
                        match src.read(&mut buf[n..]) {
                            Ok(0) => break,
                            Ok(k) => n += k,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(Error::io("input", e)),
                        }
                    }
                    if n == 0 {
                        return Ok(());
                    }
                    if pos + n as u64 > store.sb.origin_size {
                        return Err(Error::Invalid(format!(
                            "the input runs past the end of the origin ({} bytes); {} bytes were written",
                            store.sb.origin_size, pos - offset
                        )));
                    }
                    match snapshot {
                        Some(sn) => store.write_snapshot(sn, &[(pos, &buf[..n])], false)?,
                        None => store.write_origin(pos, &buf[..n], false)?,
                    }
                    pos += n as u64;
                }
            })();
            log_events(&mut store, g);
            res?;
            store.flush()?;
            let written = pos - offset;
            if g.json {
                return ok(doc(
                    json!({"schema_version": 1, "written_bytes": written, "offset": offset}),
                ));
            }
            if g.quiet {
                return ok(String::new());
            }
            ok(format!(
                "wrote {} ({written} bytes) to the origin at offset {offset}\n",
                human_bytes(written)
            ))
        }
        Cmd::Check { data } => {
            let mut store = open(g, Use::Read, ctx)?;
            let rep = if *data {
                let pb = progress(g, ctx, 0, "verifying saved chunks");
                let rep = store.check_with(true, &mut |done, total| {
                    pb.set_length(total);
                    pb.set_position(done);
                })?;
                pb.finish_and_clear();
                rep
            } else {
                store.check()?
            };
            let code = if !rep.corruption.is_empty() {
                6
            } else if !rep.leaks.is_empty() {
                9
            } else {
                0
            };
            let text = if g.json {
                let mut v = serde_json::to_value(&rep).unwrap_or(Value::Null);
                v["clean"] = json!(rep.is_clean());
                doc(json!({"schema_version": 1, "check": v}))
            } else {
                let plural = |n: u64, w: &str| format!("{n} {w}{}", if n == 1 { "" } else { "s" });
                let mut t = format!(
                    "{}: {}, {}, {} in use, {} free\n",
                    store.name,
                    plural(rep.snapshots, "snapshot"),
                    plural(rep.records, "record"),
                    plural(rep.used_chunks, "chunk"),
                    plural(rep.free_chunks, "chunk"),
                );
                if rep.data_checked {
                    t.push_str(&format!(
                        "{} read and verified against the checksums\n",
                        plural(rep.chunks_verified, "saved chunk")
                    ));
                }
                for c in rep.corruption.iter().take(50) {
                    t.push_str(&format!("CORRUPT: {c}\n"));
                }
                for l in rep.leaks.iter().take(50) {
                    t.push_str(&format!("leaked: {l}\n"));
                }
                t.push_str(match code {
                    0 => "clean\n",
                    9 => "leaked space found (no corruption): the space is lost, no snapshot is affected\n",
                    _ => "CORRUPTION found\n",
                });
                t
            };
            Ok(Output { text, code })
        }
        Cmd::Serve { socket, listen } => {
            if ctx.shared.is_some() {
                return Err(Error::Busy("this store is already being served".into()));
            }
            let path = store_path(g)?;
            crate::serve::serve(
                path,
                crate::serve::ServeOptions {
                    socket: socket.clone(),
                    listen: listen.clone(),
                    verbose: g.verbose > 0,
                },
            )?;
            ok(String::new())
        }
        Cmd::Upgrade => {
            if ctx.shared.is_some() {
                return Err(Error::Busy(
                    "upgrade a store before serving it, not through the server".into(),
                ));
            }
            let path = store_path(g)?;
            let mut store = Store::open_for_upgrade(path)?;
            let rep = store.upgrade()?;
            if g.json {
                return ok(doc(json!({"schema_version": 1, "upgrade": rep})));
            }
            if g.quiet {
                return ok(String::new());
            }
            if rep.from_version == rep.to_version {
                return ok(format!(
                    "{} is already in format version {}; nothing to do\n",
                    path.display(),
                    rep.to_version
                ));
            }
            ok(format!(
                "upgraded {} from format version {} to {}: {} snapshots, {} records, {} saved chunks hashed\n",
                path.display(),
                rep.from_version,
                rep.to_version,
                rep.snapshots,
                rep.records,
                rep.chunks_hashed
            ))
        }
        Cmd::GenerateDocs { out_dir } => {
            generate_docs(out_dir)?;
            ok(String::new())
        }
    }
}

/// An output file written whole or not at all: bytes go to a temporary file in the same
/// directory, which `commit` makes durable and renames over the target. Dropped without a
/// commit (an error part way), the temporary file is removed and the target left as it was.
/// A device (or anything not a regular file) is written in place.
struct AtomicOutput {
    file: std::fs::File,
    target: PathBuf,
    tmp: Option<PathBuf>,
}

impl AtomicOutput {
    fn create(target: &Path) -> Result<AtomicOutput> {
        let err = |e| Error::io(format!("output {}", target.display()), e);
        let special = std::fs::metadata(target).is_ok_and(|m| !m.is_file());
        if special {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(target)
                .map_err(err)?;
            return Ok(AtomicOutput {
                file,
                target: target.to_path_buf(),
                tmp: None,
            });
        }
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| {
                Error::Invalid(format!("output {} is not a file name", target.display()))
            })?;
        let tmp = target.with_file_name(format!(".{name}.snapctl-{}.tmp", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(err)?;
        Ok(AtomicOutput {
            file,
            target: target.to_path_buf(),
            tmp: Some(tmp),
        })
    }

    fn commit(mut self) -> Result<()> {
        let err = |e| Error::io(format!("output {}", self.target.display()), e);
        self.file.sync_all().map_err(err)?;
        if let Some(tmp) = self.tmp.take() {
            if let Err(e) = std::fs::rename(&tmp, &self.target) {
                let _ = std::fs::remove_file(&tmp);
                return Err(err(e));
            }
        }
        Ok(())
    }
}

impl Drop for AtomicOutput {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Reads a whole view in 4 MiB steps and hands each step to `write`, with a progress bar on a
/// terminal. Through a server, the store is locked per step, so NBD clients are not stalled for
/// the length of the copy. Returns the bytes copied.
fn stream_view(
    g: &Global,
    ctx: &Ctx,
    name: &str,
    what: &str,
    write: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<u64> {
    let mut held = Some(open(g, Use::Read, ctx)?);
    let (total, chunk) = match &held {
        Some(s) => {
            if name != "origin" {
                s.snapshot(name)?;
            }
            (s.sb.origin_size, s.sb.chunk_size)
        }
        None => (0, 4096),
    };
    if ctx.shared.is_some() {
        held = None;
    }
    let pb = progress(g, ctx, total, &format!("{what} {name}"));
    let step = (4u64 << 20).max(chunk);
    let mut buf = crate::io::AlignedBuf::new(step as usize);
    let mut off = 0;
    while off < total {
        let n = step.min(total - off) as usize;
        match &held {
            Some(s) => s.read_view(name, off, &mut buf.as_mut_slice()[..n])?,
            None => open(g, Use::Read, ctx)?.read_view(name, off, &mut buf.as_mut_slice()[..n])?,
        }
        write(off, &buf.as_slice()[..n])?;
        off += n as u64;
        pb.set_position(off);
    }
    pb.finish_and_clear();
    Ok(total)
}

/// `restore NAME --to DEVICE`: the snapshot's full image onto another device or file.
fn restore_to(g: &Global, ctx: &Ctx, name: &str, dev: &Path) -> Result<Output> {
    let (origin_path, store_size) = {
        let s = open(g, Use::Read, ctx)?;
        s.snapshot(name)?;
        (PathBuf::from(&s.sb.origin_path), s.sb.origin_size)
    };
    let store = store_path(g).map(|p| ctx.path(p)).ok();
    let same = |a: &Path, b: &Path| match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => {
            use std::os::unix::fs::MetadataExt;
            (x.dev() == y.dev() && x.ino() == y.ino()) || (x.rdev() != 0 && x.rdev() == y.rdev())
        }
        _ => false,
    };
    if same(dev, &origin_path) || store.as_deref().is_some_and(|s| same(dev, s)) {
        return Err(Error::Invalid(format!(
            "--to {} is the origin or the store; give another device or file (or restore without --to)",
            dev.display()
        )));
    }
    let d = crate::io::open_device(
        dev,
        crate::io::OpenMode {
            write: true,
            exclusive: true,
        },
    )
    .map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => {
            Error::NotFound(format!("--to {}: no such file or device", dev.display()))
        }
        Some(libc::EBUSY) => Error::Busy(format!("--to {} is in use (mounted?)", dev.display())),
        _ => Error::io(format!("--to {}", dev.display()), e),
    })?;
    if d.size < store_size {
        return Err(Error::Invalid(format!(
            "--to {} holds {} bytes, less than the origin's {store_size}",
            dev.display(),
            d.size
        )));
    }
    let io = crate::io::engine_for(d, crate::io::EngineChoice::from_env())
        .map_err(|e| Error::io(format!("--to {}", dev.display()), e))?;
    let werr = |e| Error::io(format!("--to {}: write", dev.display()), e);
    let total = stream_view(g, ctx, name, "restore", &mut |off, data| {
        io.write_at(data, off).map_err(werr)
    })?;
    io.flush().map_err(werr)?;
    if g.json {
        return ok(doc(
            json!({"schema_version": 1, "restored": name, "to": dev.display().to_string(),
            "backup": null, "written_bytes": total}),
        ));
    }
    if g.quiet {
        return ok(String::new());
    }
    ok(format!(
        "wrote '{name}' ({}) to {}; the origin is unchanged\n",
        human_bytes(total),
        dev.display()
    ))
}

fn parse_now(now: Option<&str>) -> Result<i64> {
    match now {
        None => Ok(chrono::Utc::now().timestamp()),
        Some(t) => chrono::DateTime::parse_from_rfc3339(t)
            .map(|d| d.timestamp())
            .map_err(|_| {
                Error::Invalid(format!(
                    "'{t}' is not an RFC 3339 time (2026-11-22T10:00:00Z)"
                ))
            }),
    }
}

fn load_config(path: &Path) -> Result<Vec<crate::schedule::StoreConfig>> {
    crate::schedule::load(path, &|p: &Path| {
        crate::serve::peek_superblock(p)
            .map(|_| ())
            .ok_or_else(|| Error::NotAStore(p.display().to_string()))
    })
}

fn error_of(kind: &str, msg: String) -> Error {
    match kind {
        "not-found" | "not-a-store" => Error::NotFound(msg),
        "already-exists" => Error::Exists(msg),
        "busy" => Error::Busy(msg),
        "invalid-argument" => Error::Invalid(msg),
        "no-space" => Error::NoSpace(msg),
        "corrupt" | "origin-mismatch" => Error::Corrupt(msg),
        _ => Error::io(msg, std::io::Error::other(kind.to_string())),
    }
}

/// Runs `snapctl --json -s STORE ARGS...` as a person would (through a running server, or on
/// the store directly) and returns its JSON document.
fn exec_json(store: &Path, args: &[String]) -> Result<Value> {
    let mut argv: Vec<String> = vec![
        "snapctl".into(),
        "--json".into(),
        "-s".into(),
        store.display().to_string(),
    ];
    argv.extend(args.iter().cloned());
    let text = match crate::serve::forward(store, &argv) {
        Some(r) => {
            let r = r?;
            if let Some((kind, msg)) = r.error {
                return Err(error_of(&kind, msg));
            }
            r.stdout
        }
        None => {
            let cli = Cli::try_parse_from(&argv).map_err(|e| Error::Invalid(e.to_string()))?;
            run(cli)?.text
        }
    };
    serde_json::from_str(&text)
        .map_err(|e| Error::Corrupt(format!("unexpected output from {args:?}: {e}")))
}

fn list_infos(store: &Path) -> Result<Vec<crate::schedule::SnapInfo>> {
    let v = exec_json(store, &["list".into()])?;
    serde_json::from_value(v["snapshots"].clone()).map_err(|e| Error::Corrupt(format!("list: {e}")))
}

/// Deletes one snapshot; false when it was already gone (another run got there first).
fn delete_quietly(store: &Path, name: &str) -> Result<bool> {
    match exec_json(store, &["delete".into(), name.into()]) {
        Ok(_) => Ok(true),
        Err(Error::NotFound(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

fn run_hook(what: &str, cmd: &str) -> Result<()> {
    let st = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .map_err(|e| Error::io(format!("{what} '{cmd}'"), e))?;
    if st.success() {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{what} '{cmd}' failed ({st}){}",
            if what == "pre-hook" {
                "; no snapshot was taken"
            } else {
                ""
            }
        )))
    }
}

const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Frozen file systems, thawed on drop, on SIGINT/SIGTERM, or when the timeout passes.
struct Frozen {
    mounts: Arc<std::sync::Mutex<Vec<(PathBuf, std::fs::File)>>>,
    done: Arc<std::sync::atomic::AtomicBool>,
    timed_out: Arc<std::sync::atomic::AtomicBool>,
    watchdog: Option<std::thread::JoinHandle<()>>,
}

fn thaw_all(mounts: &std::sync::Mutex<Vec<(PathBuf, std::fs::File)>>, why: &str) {
    use std::os::unix::io::AsRawFd;
    if let Ok(mut m) = mounts.lock() {
        for (p, f) in m.drain(..) {
            // SAFETY: FITHAW on a directory fd we opened.
            let r = unsafe { libc::ioctl(f.as_raw_fd(), FITHAW as _, 0) };
            if r != 0 {
                eprintln!(
                    "snapctl: could not thaw {}: {}",
                    p.display(),
                    std::io::Error::last_os_error()
                );
            } else if !why.is_empty() {
                eprintln!("snapctl: thawed {} {why}", p.display());
            }
        }
    }
}

impl Frozen {
    fn freeze(paths: &[PathBuf], timeout: i64) -> Result<Frozen> {
        use std::os::unix::io::AsRawFd;
        use std::sync::atomic::{AtomicBool, Ordering};
        crate::serve::install_signals()?;
        let mounts = Arc::new(std::sync::Mutex::new(Vec::new()));
        for p in paths {
            let f = std::fs::File::open(p)
                .map_err(|e| Error::io(format!("--freeze {}", p.display()), e))?;
            // SAFETY: FIFREEZE on a directory fd we opened.
            if unsafe { libc::ioctl(f.as_raw_fd(), FIFREEZE as _, 0) } != 0 {
                let e = std::io::Error::last_os_error();
                thaw_all(&mounts, "");
                return Err(match e.raw_os_error() {
                    Some(libc::EBUSY) => {
                        Error::Busy(format!("--freeze {}: already frozen", p.display()))
                    }
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOTTY) => {
                        Error::Invalid(format!(
                            "--freeze {}: not the mount point of a file system that can be frozen",
                            p.display()
                        ))
                    }
                    _ => Error::io(format!("--freeze {}", p.display()), e),
                });
            }
            if let Ok(mut m) = mounts.lock() {
                m.push((p.clone(), f));
            }
        }
        let done = Arc::new(AtomicBool::new(false));
        let timed_out = Arc::new(AtomicBool::new(false));
        let (m2, d2, t2) = (mounts.clone(), done.clone(), timed_out.clone());
        let start = std::time::Instant::now();
        let watchdog = std::thread::spawn(move || {
            while !d2.load(Ordering::SeqCst) {
                if crate::serve::stop_requested() {
                    thaw_all(&m2, "on a signal; no snapshot was taken");
                    std::process::exit(130);
                }
                if start.elapsed().as_secs_f64() >= timeout as f64 {
                    t2.store(true, Ordering::SeqCst);
                    thaw_all(&m2, &format!("after the {timeout} s freeze timeout"));
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        Ok(Frozen {
            mounts,
            done,
            timed_out,
            watchdog: Some(watchdog),
        })
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        thaw_all(&self.mounts, "");
    }
}

/// pre-hook, freeze, create, thaw, post-hook: the thaw and the post-hook happen whatever the
/// outcome once the pre-hook succeeded.
fn consistent_create(
    store: &Path,
    create_args: &[String],
    freeze: &[PathBuf],
    timeout: i64,
    pre: Option<&str>,
    post: Option<&str>,
    quiet: bool,
) -> Result<Value> {
    if let Some(cmd) = pre {
        run_hook("pre-hook", cmd)?;
    }
    let result = (|| {
        let frozen = if freeze.is_empty() {
            None
        } else {
            Some(Frozen::freeze(freeze, timeout)?)
        };
        let r = exec_json(store, create_args);
        if let Some(f) = frozen {
            let late = f.timed_out.load(std::sync::atomic::Ordering::SeqCst);
            drop(f);
            if late {
                let name = r
                    .as_ref()
                    .ok()
                    .and_then(|v| v["snapshot"]["name"].as_str().map(String::from));
                return Err(Error::io(
                    format!(
                        "the freeze timed out ({timeout} s) before the snapshot was taken{}",
                        name.map(|n| format!("; snapshot '{n}' may not be consistent"))
                            .unwrap_or_default()
                    ),
                    std::io::Error::from(std::io::ErrorKind::TimedOut),
                ));
            }
        }
        r
    })();
    if let Some(cmd) = post {
        if let Err(e) = run_hook("post-hook", cmd) {
            return match result {
                Ok(v) => Err(Error::Invalid(format!(
                    "{e}; snapshot '{}' was taken",
                    v["snapshot"]["name"].as_str().unwrap_or("?")
                ))),
                Err(orig) => {
                    if !quiet {
                        eprintln!("snapctl: {e}");
                    }
                    Err(orig)
                }
            };
        }
    }
    result
}

fn schedule_run(g: &Global, config: &Path, dry_run: bool, now: Option<&str>) -> Result<Output> {
    let at = parse_now(now)?;
    let stores = load_config(config)?;
    let only = g.store.as_deref();
    let mut reports = Vec::new();
    let mut text = String::new();
    let mut failed = false;
    for st in stores.iter().filter(|s| only.is_none_or(|o| o == s.path)) {
        let mut created = Vec::new();
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        let mut snaps = list_infos(&st.path)?;
        for p in &st.periods {
            let Some(name) = crate::schedule::due(p, &snaps, at) else {
                continue;
            };
            if dry_run {
                text.push_str(&format!(
                    "{}: would take '{name}' (period {})\n",
                    st.name, p.name
                ));
                created.push(json!({"name": name, "period": p.name}));
                // retention below sees it as taken
                snaps.push(crate::schedule::SnapInfo {
                    name,
                    created: crate::names::rfc3339(at),
                    expires: None,
                    labels: [("period".to_string(), p.name.clone())]
                        .into_iter()
                        .collect(),
                });
                continue;
            }
            let mut args = vec![
                "create".to_string(),
                name.clone(),
                "--label".into(),
                format!("period={}", p.name),
            ];
            if now.is_some() {
                args.extend(["--created-at".into(), crate::names::rfc3339(at)]);
            }
            match consistent_create(
                &st.path,
                &args,
                &p.freeze,
                30,
                p.pre_hook.as_deref(),
                p.post_hook.as_deref(),
                g.quiet,
            ) {
                Ok(_) => {
                    text.push_str(&format!("{}: took '{name}' (period {})\n", st.name, p.name));
                    created.push(json!({"name": name, "period": p.name}));
                }
                // Another run took it a moment ago: nothing to do.
                Err(Error::Exists(_)) => {}
                Err(e) => {
                    failed = true;
                    text.push_str(&format!("{}: period {}: {e}\n", st.name, p.name));
                    errors.push(json!({"period": p.name, "error": e.to_string()}));
                }
            }
        }
        if !dry_run {
            snaps = list_infos(&st.path)?;
        }
        let mut verdicts: Vec<crate::schedule::Verdict> = Vec::new();
        for p in &st.periods {
            verdicts.extend(crate::schedule::retention(p, &snaps, at));
        }
        verdicts.extend(
            crate::schedule::expiry(&snaps, at)
                .into_iter()
                .filter(|v| v.delete),
        );
        let mut seen = std::collections::HashSet::new();
        for v in verdicts.into_iter().filter(|v| v.delete) {
            if !seen.insert(v.name.clone()) {
                continue;
            }
            if dry_run || delete_quietly(&st.path, &v.name)? {
                text.push_str(&format!(
                    "{}: {} '{}' ({})\n",
                    st.name,
                    if dry_run { "would delete" } else { "deleted" },
                    v.name,
                    v.rule
                ));
                deleted.push(json!({"name": v.name, "reason": v.rule}));
            }
        }
        reports.push(
            json!({"store": st.name, "path": st.path.display().to_string(),
            "created": created, "deleted": deleted, "errors": errors}),
        );
    }
    if only.is_some() && reports.is_empty() {
        return Err(Error::NotFound(format!(
            "store {} is not in {}",
            only.map(|p| p.display().to_string()).unwrap_or_default(),
            config.display()
        )));
    }
    let code = if failed { 1 } else { 0 };
    if g.json {
        return Ok(Output {
            text: doc(
                json!({"schema_version": 1, "dry_run": dry_run, "now": crate::names::rfc3339(at), "stores": reports}),
            ),
            code,
        });
    }
    if text.is_empty() && !g.quiet {
        text = "nothing due, nothing to delete\n".into();
    }
    Ok(Output {
        text: if g.quiet { String::new() } else { text },
        code,
    })
}

fn schedule_status(g: &Global, config: &Path, now: Option<&str>) -> Result<Output> {
    let at = parse_now(now)?;
    let stores = load_config(config)?;
    let only = g.store.as_deref();
    let mut rows = Vec::new();
    let mut overdue_any = false;
    for st in stores.iter().filter(|s| only.is_none_or(|o| o == s.path)) {
        let snaps = list_infos(&st.path)?;
        for p in &st.periods {
            let newest = snaps
                .iter()
                .filter(|s| s.period() == Some(p.name.as_str()))
                .max_by_key(|s| s.created_ts());
            let b = crate::schedule::boundary(p.every, at);
            let taken = newest.is_some_and(|s| s.created_ts() >= b);
            let next_due = if taken { b + p.every } else { b };
            let overdue = !taken && at > b + crate::schedule::grace(p.every);
            overdue_any |= overdue;
            rows.push(json!({"store": st.name, "period": p.name,
                "newest": newest.map(|s| s.name.clone()),
                "newest_created": newest.map(|s| s.created.clone()),
                "next_due": crate::names::rfc3339(next_due), "overdue": overdue}));
        }
    }
    let code = if overdue_any { 10 } else { 0 };
    if g.json {
        return Ok(Output {
            text: doc(
                json!({"schema_version": 1, "now": crate::names::rfc3339(at), "periods": rows}),
            ),
            code,
        });
    }
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header(vec!["STORE", "PERIOD", "NEWEST", "NEXT DUE", "STATE"]);
    for r in &rows {
        table.add_row(vec![
            r["store"].as_str().unwrap_or("").to_string(),
            r["period"].as_str().unwrap_or("").to_string(),
            r["newest"].as_str().unwrap_or("-").to_string(),
            r["next_due"].as_str().unwrap_or("").to_string(),
            if r["overdue"] == true {
                "OVERDUE".to_string()
            } else {
                "ok".to_string()
            },
        ]);
    }
    let mut t = String::new();
    for l in table.to_string().lines() {
        t.push_str(l.strip_prefix(' ').unwrap_or(l).trim_end());
        t.push('\n');
    }
    Ok(Output {
        text: if g.quiet { String::new() } else { t },
        code,
    })
}

/// Runs a command forwarded by another snapctl through the control socket, on the server's store.
pub fn run_forwarded(
    shared: Arc<Shared>,
    argv: Vec<String>,
    cwd: PathBuf,
    stdin: Option<std::fs::File>,
    stdout: Option<std::fs::File>,
) -> crate::serve::ControlReply {
    let reply =
        |code: i32, stdout: String, error: Option<(String, String)>| crate::serve::ControlReply {
            code,
            stdout,
            error,
        };
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            return reply(
                2,
                String::new(),
                Some(("invalid-argument".into(), e.to_string())),
            )
        }
    };
    if matches!(
        cli.cmd,
        Cmd::Init { .. } | Cmd::Serve { .. } | Cmd::GenerateDocs { .. }
    ) {
        let e = Error::Busy("the store is being served by snapctl serve; stop it first".into());
        return reply(
            e.exit_code(),
            String::new(),
            Some((e.kind().into(), e.to_string())),
        );
    }
    let ctx = Ctx {
        shared: Some(shared),
        cwd: Some(cwd),
        stdin,
        stdout,
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_ctx(cli, &ctx))) {
        Ok(Ok(out)) => reply(out.code, out.text, None),
        Ok(Err(e)) => reply(
            e.exit_code(),
            String::new(),
            Some((e.kind().into(), e.to_string())),
        ),
        Err(_) => reply(
            70,
            String::new(),
            Some(("internal".into(), "internal error in the server".into())),
        ),
    }
}

/// Writes man/ and completions/ under `dir` from the clap definitions.
pub fn generate_docs(dir: &Path) -> Result<()> {
    let man = dir.join("man");
    let comp = dir.join("completions");
    for d in [&man, &comp] {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d.display().to_string(), e))?;
    }
    let mut cmd = Cli::command();
    cmd.build(); // propagates the global options into every subcommand's page
    let write = |p: PathBuf, bytes: Vec<u8>| -> Result<()> {
        std::fs::write(&p, bytes).map_err(|e| Error::io(p.display().to_string(), e))
    };
    let render = |c: clap::Command| -> Result<Vec<u8>> {
        let mut v = Vec::new();
        clap_mangen::Man::new(c)
            .date("")
            .render(&mut v)
            .map_err(|e| Error::io("man page", e))?;
        Ok(v)
    };
    write(man.join("snapctl.1"), render(cmd.clone())?)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("snapctl-{}", sub.get_name());
        let c = sub.clone().name(name.clone()).after_long_help(AFTER_HELP);
        write(man.join(format!("{name}.1")), render(c)?)?;
    }
    for (shell, file) in [
        (clap_complete::Shell::Bash, "snapctl.bash"),
        (clap_complete::Shell::Zsh, "_snapctl"),
        (clap_complete::Shell::Fish, "snapctl.fish"),
    ] {
        let mut v = Vec::new();
        let mut c = Cli::command();
        clap_complete::generate(shell, &mut c, "snapctl", &mut v);
        write(comp.join(file), v)?;
    }
    Ok(())
}
