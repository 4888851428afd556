//! The operations layer: every operation snapctl offers, as a typed [`Request`] answered by a
//! typed [`Response`]. The command line, the scheduler and the control socket all go through
//! here: the CLI parses arguments into a request, hands it to a [`Client`] and renders the
//! response; the server decodes a request from its control socket and calls [`exec`]. Nothing in
//! the program builds an argv or parses its own JSON.
//!
//! Operations on one store are requests ([`exec`] runs them against a [`Host`]: a store opened
//! by this process, or the one a server holds). Operations that span stores or run programs
//! (consistent create with hooks and freeze, schedule, prune) live in [`consistent`] and
//! [`schedule`] and call a [`Client`] one request at a time, always in the caller's process.

pub mod catch;
pub mod client;
pub mod consistent;
mod exec;
pub mod protocol;
pub mod schedule;

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::RwLockWriteGuard;

use serde::{Deserialize, Serialize};

pub use client::{connect, Client, Local, Remote};
pub use exec::exec;

use crate::error::Result;
use crate::store::cow::CheckReport;
use crate::store::{Event, Snapshot, Store};

/// One operation on one store. Data (an image to export, bytes to write, a device to restore
/// onto) never travels inside a request: it goes through one descriptor passed beside it, which
/// the caller opened with its own rights.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Info,
    List,
    Show {
        name: String,
    },
    Create(CreateSpec),
    SetWritable {
        name: String,
    },
    Rename {
        old: String,
        new: String,
    },
    Delete {
        names: Vec<String>,
        /// Even when NBD clients have one open.
        force: bool,
    },
    /// The view's whole image, written in order to the passed descriptor.
    Export {
        name: String,
    },
    /// Bytes read from the passed descriptor until its end, written at `offset` into the
    /// origin (through copy-on-write) or into a writable snapshot.
    Write {
        offset: u64,
        snapshot: Option<String>,
    },
    Diff {
        from: String,
        to: String,
    },
    /// The origin made identical to a snapshot, after a backup snapshot unless `backup` is false.
    Restore {
        name: String,
        backup: bool,
        force: bool,
    },
    /// Finish a restore a crash interrupted.
    ResumeRestore,
    /// The snapshot's whole image onto the passed descriptor (another device or file).
    RestoreTo {
        name: String,
        /// What the caller calls the target, for messages only.
        target: String,
    },
    Check {
        data: bool,
        /// Mend what can be mended (leaks, indexes, counters, a superblock from its backup).
        #[serde(default)]
        repair: bool,
        /// With `repair`: remove damaged rows, marking the snapshots that read them invalid.
        #[serde(default)]
        drop_damaged: bool,
    },
}

/// A new snapshot, every value already parsed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct CreateSpec {
    pub name: String,
    /// Unix seconds.
    pub expires: Option<i64>,
    pub labels: BTreeMap<String, String>,
    /// Snapshot this view instead of the origin.
    pub from: Option<String>,
    pub writable: bool,
    /// Stamp this creation time (unix seconds) instead of now.
    pub created: Option<i64>,
}

/// How a request uses the origin: a local client opens the store accordingly.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Access {
    /// Reads only.
    Read,
    /// Changes snapshots: the origin must not be written behind snapctl's back.
    Change,
    /// Writes the origin.
    Write,
}

impl Request {
    pub fn access(&self) -> Access {
        match self {
            Request::Info
            | Request::List
            | Request::Show { .. }
            | Request::Export { .. }
            | Request::Diff { .. }
            | Request::RestoreTo { .. }
            | Request::Check { repair: false, .. } => Access::Read,
            Request::Check { repair: true, .. } => Access::Change,
            Request::Create(_)
            | Request::SetWritable { .. }
            | Request::Rename { .. }
            | Request::Delete { .. }
            | Request::Write {
                snapshot: Some(_), ..
            } => Access::Change,
            Request::Write { snapshot: None, .. }
            | Request::Restore { .. }
            | Request::ResumeRestore => Access::Write,
        }
    }

    /// Whether the request needs a descriptor beside it.
    pub fn takes_data(&self) -> bool {
        matches!(
            self,
            Request::Export { .. } | Request::Write { .. } | Request::RestoreTo { .. }
        )
    }
}

/// What `info` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreInfo {
    pub format_version: u32,
    pub uuid: String,
    pub store: String,
    pub origin: String,
    pub origin_size: u64,
    pub chunk_size: u64,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub snapshot_count: u64,
    pub on_full: String,
    pub io_engine: String,
    pub events: Vec<Event>,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Response {
    Info(StoreInfo),
    /// One snapshot (show, create, set-writable, rename).
    Snapshot {
        snapshot: Snapshot,
        chunk_size: u64,
    },
    List {
        store: String,
        chunk_size: u64,
        snapshots: Vec<Snapshot>,
    },
    Deleted {
        names: Vec<String>,
        freed_bytes: u64,
    },
    Exported {
        name: String,
        bytes: u64,
    },
    Written {
        offset: u64,
        bytes: u64,
        snapshot: Option<String>,
    },
    Diff {
        from: String,
        to: String,
        chunk_size: u64,
        /// (offset, length) in bytes, merged where adjacent.
        ranges: Vec<(u64, u64)>,
    },
    Restored {
        name: String,
        backup: Option<String>,
        written_bytes: u64,
    },
    RestoredTo {
        name: String,
        target: String,
        written_bytes: u64,
    },
    Resumed {
        restore: Option<String>,
    },
    Checked {
        store: String,
        report: CheckReport,
    },
}

/// A response and what the store did on its own meanwhile (the on-full policy).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub response: Response,
    #[serde(default)]
    pub events: Vec<Event>,
}

/// Where a request runs: a store this process opened, or the one a server holds and shares with
/// its NBD clients.
pub trait Host: Sync {
    /// The store, locked. Long operations take the lock once per step, so NBD clients of a
    /// server are not stalled for the length of a copy.
    fn lock(&self) -> Result<RwLockWriteGuard<'_, Store>>;
    /// How many NBD connections have `view` open (0 outside a server).
    fn open_count(&self, _view: &str) -> usize {
        0
    }
}

/// Formats `store` as the exception store of `origin` (never through a server: the store does
/// not exist yet, and `Store::init` refuses one that holds snapctl data unless forced).
pub fn init(
    store: &std::path::Path,
    origin: &std::path::Path,
    opts: &crate::store::InitOptions,
) -> Result<crate::store::format::Superblock> {
    // Its lock would only say "busy, try again later"; a server never finishes by itself.
    if matches!(Remote::connect(store), Ok(Some(_))) {
        return Err(crate::error::Error::Busy(format!(
            "store {} is being served by `snapctl serve`; stop the server before formatting it",
            store.display()
        )));
    }
    Store::init(store, origin, opts)
}

/// Converts a store of an older format in place; refused while a server holds it.
pub fn upgrade(store: &std::path::Path) -> Result<crate::store::upgrade::UpgradeReport> {
    if Remote::connect(store)?.is_some() {
        return Err(crate::error::Error::Busy(format!(
            "store {} is being served by `snapctl serve`; stop the server, then upgrade it",
            store.display()
        )));
    }
    Store::open_for_upgrade(store)?.upgrade()
}

/// A descriptor passed beside a request.
pub type Data = Option<File>;

/// Progress of a long operation: (done, total) in bytes.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);
