//! What every connection of a server shares: the store, the exports NBD clients hold open, the
//! shutdown flag. Control requests reach the same store through [`Host`].

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::Error;
use crate::ops::Host;
use crate::store::Store;

/// What every connection shares: the store, the exports clients hold open, the shutdown flag.
pub struct Shared {
    /// Read batches share it (their I/O in flight together); every change holds it alone.
    pub store: RwLock<Store>,
    pub open_exports: Mutex<HashMap<String, usize>>,
    pub shutdown: AtomicBool,
    pub verbose: bool,
}

impl Shared {
    pub fn new(store: Store, verbose: bool) -> Self {
        Shared {
            store: RwLock::new(store),
            open_exports: Mutex::new(HashMap::new()),
            shutdown: AtomicBool::new(false),
            verbose,
        }
    }

    /// The store, for a change (or anything else), held alone.
    pub fn lock(&self) -> Result<RwLockWriteGuard<'_, Store>, Error> {
        self.store.write().map_err(|_| poisoned())
    }

    /// The store, shared with other readers: for batches that only read.
    pub fn read(&self) -> Result<RwLockReadGuard<'_, Store>, Error> {
        self.store.read().map_err(|_| poisoned())
    }

    /// How many connections have `name` open.
    pub fn open_count(&self, name: &str) -> usize {
        self.open_exports
            .lock()
            .map(|m| m.get(name).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    pub(super) fn log(&self, msg: &str) {
        if self.verbose {
            eprintln!("snapctl serve: {msg}");
        }
    }
}

fn poisoned() -> Error {
    Error::Corrupt("the server's store lock was poisoned by a failed request".into())
}

impl Host for Shared {
    fn lock(&self) -> Result<RwLockWriteGuard<'_, Store>, Error> {
        Shared::lock(self)
    }

    fn open_count(&self, view: &str) -> usize {
        Shared::open_count(self, view)
    }
}
