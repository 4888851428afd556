//! The command line's grammar: every command, option and help text (clap). The man pages and
//! shell completions are generated from it (`snapctl generate-docs`, scripts/gen-docs.sh).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub const AFTER_HELP: &str = "\
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
 10  check --repair repaired the store, which is now clean
 70  internal error
128+N  interrupted by signal N (130: SIGINT, 143: SIGTERM) during export, restore or a hook

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
  write  -> {\"schema_version\":1,\"written_bytes\":N,\"offset\":N,\"snapshot\":NAME or null}
  check  -> {\"schema_version\":1,\"check\":{clean, data_checked, chunks_verified,
            damaged:[{snapshots:[NAME...], offset, length, store_chunk}...], snapshots,
            records, used_chunks, free_chunks, high_water_chunks, corruption:[...], leaks:[...],
            notes:[...], repaired:[...]}} (with --repair: the state after repairing,
            and what was done in repaired)
  Errors -> {\"schema_version\":1,\"error\":{\"kind\":KIND,\"message\":TEXT}} on stderr, with
  KIND one of invalid-argument, not-found, already-exists, not-a-store, busy, corrupt,
  origin-mismatch, no-space, snapshot-invalid, io, internal.

ENVIRONMENT:
  SNAPCTL_STORE         the store, when -s is not given
  SNAPCTL_IO_ENGINE     uring, sync or auto (default auto: io_uring where the kernel allows)
  SNAPCTL_LOCK_TIMEOUT  seconds to wait for another snapctl on the same store (default 5)
  SNAPCTL_PIPELINE      0: serve answers a write only once the origin has it (default 1:
                        answered at once; its copies and the origin write follow); held:
                        as 1, but answered writes wait for a FLUSH, a FUA write or a
                        change before their copies are made (for tests)
  SNAPCTL_PROFILE       1: serve prints where the data path's time went when it stops";

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
        /// Copy-on-write unit: a power of two from 4K to 1M (4096, 4K, 4KiB, 1M, 1MiB). Larger
        /// chunks make first writes after a snapshot cheaper (one copy covers more writes);
        /// smaller ones keep the copies of scattered writes small
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
        /// Kill a hook still running after this long (a duration: 30s, 10m); a pre-hook killed
        /// means no snapshot
        #[arg(long, value_name = "DURATION", default_value = "10m")]
        hook_timeout: String,
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
        #[arg(long, env = "SNAPCTL_CONFIG", default_value = crate::ops::schedule::policy::DEFAULT_CONFIG)]
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
    /// Convert a store written by an older snapctl (format 2 or 3) to this version, in place
    ///
    /// Adds a checksum to every saved chunk (each is read once) and to every metadata row, in
    /// one commit; a crash part way leaves the store as it was or converted, and running it
    /// again finishes. A store already in this format is left alone.
    Upgrade,
    /// Verify the store: checksums, single ownership of every chunk, space accounting
    ///
    /// Plain `check` reads the metadata only. `--data` also reads every saved chunk and
    /// verifies it against its checksum, naming each damaged snapshot and byte range.
    ///
    /// `--repair` mends what can be mended without losing anything: leaked chunks are freed,
    /// the time index, record heads, name index and free list are rebuilt from the rows they
    /// index, counters are recounted, and a damaged superblock is rewritten from its backup
    /// copy. Damage that costs data (a record or overlay that fails its checksum, saved bytes
    /// that fail theirs with --data) is named with the snapshots and byte ranges it affects;
    /// with `--drop-damaged` those rows are removed and only those snapshots are marked
    /// invalid, everything else staying readable. Exit status: 0 clean, 9 leaks only, 6
    /// corruption (left), 10 repaired and now clean.
    Check {
        /// Also read and verify every saved chunk (time proportional to the space in use)
        #[arg(long)]
        data: bool,
        /// Mend leaks, indexes, counters and a damaged superblock (from its backup copy)
        #[arg(long)]
        repair: bool,
        /// With --repair: remove damaged rows and mark the snapshots that read them invalid
        #[arg(long, requires = "repair")]
        drop_damaged: bool,
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
    /// to /run/snapctl, UUID being the store's) and on TCP only with --listen, which needs TLS
    /// (--tls-cert and --tls-key). While it runs, every other snapctl command on the store is carried
    /// out by the server through its control socket (UUID.ctl in the same directory), found from
    /// the store path. SIGTERM or SIGINT finish the requests in flight, commit, and exit 0.
    ///
    /// Only root and the user the server runs as may use its unix sockets (and, with --group,
    /// the members of that group). The run directory is created mode 0700 (0710 and owned by
    /// the group with --group); if it exists it must belong to the server's user, and is given
    /// that mode; one belonging to another user is refused (exit 2). The NBD and control sockets
    /// are created mode 0600 (0660 and owned by the group with --group), never wider for an
    /// instant. Every connection's peer credentials are checked as well: a peer that is not
    /// root, the server's user, or (with --group) in the group is disconnected at once and one
    /// line is logged. A missing parent directory of --socket is created like the run directory;
    /// an existing one is left as it is. A stale socket left by a server that died is replaced; anything else at
    /// a socket's path (a file, a directory, a symlink) is never deleted: the server refuses to
    /// start (exit 4). At most 64 NBD and 32 control connections are served at once; beyond
    /// that a new connection is closed and logged.
    ///
    /// TCP needs TLS: --listen is refused without --tls-cert and --tls-key (PEM files: the
    /// server's certificate chain and its private key), checked before anything starts. A TCP
    /// client must start TLS (NBD_OPT_STARTTLS) before anything else: every other option is
    /// refused until it does (clients: nbds:// URIs in libnbd, tls-creds in qemu). With
    /// --tls-client-ca, clients must also present a certificate signed by that CA. --no-tls
    /// serves plain NBD instead, on a loopback address only. The unix socket is always plain
    /// NBD (protected by its permissions).
    Serve {
        /// Unix socket for NBD clients (a missing parent directory is created 0700, or 0710 with
        /// --group)
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Also listen on TCP: PORT or HOST:PORT (without a host, 127.0.0.1); needs --tls-cert
        /// and --tls-key, or --no-tls on a loopback address
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
        /// The server's certificate chain for TLS on --listen (PEM: its certificate first)
        #[arg(long, value_name = "FILE")]
        tls_cert: Option<PathBuf>,
        /// The private key of --tls-cert (PEM)
        #[arg(long, value_name = "FILE")]
        tls_key: Option<PathBuf>,
        /// Require TCP clients to present a certificate signed by this CA (PEM)
        #[arg(long, value_name = "FILE")]
        tls_client_ca: Option<PathBuf>,
        /// Serve --listen as plain NBD, without TLS: allowed on a loopback address only
        /// (127.0.0.0/8 or ::1), where anyone on this machine who can reach the port can read
        /// and write the origin and every snapshot
        #[arg(long)]
        no_tls: bool,
        /// Let the members of GROUP (a group name or numeric gid) use the sockets too: sockets
        /// 0660 and the run directory 0710, owned by GROUP
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
        /// Memory for the store's metadata (like 64M or 1G, at least 4M): half for its page
        /// cache, half for the exception records last read, decoded and verified. Whatever the number
        /// of snapshots and exceptions, the server grows beyond its start by this, its
        /// connections' buffers and the writes queued behind their copies (at most 32 MiB)
        #[arg(long, value_name = "SIZE", default_value = "64M")]
        cache: String,
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
        #[arg(long, env = "SNAPCTL_CONFIG", default_value = crate::ops::schedule::policy::DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Each period's newest snapshot and next due time; exits 10 when one is overdue
    Status {
        /// Evaluate as if it were TIME (RFC 3339)
        #[arg(long, value_name = "TIME")]
        now: Option<String>,
        /// Configuration file
        #[arg(long, env = "SNAPCTL_CONFIG", default_value = crate::ops::schedule::policy::DEFAULT_CONFIG)]
        config: PathBuf,
    },
}
