//! What every connection of a server shares: the store, the exports NBD clients hold open, the
//! shutdown flag. Control requests reach the same store through [`Host`].

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, MutexGuard};

use crate::error::Error;
use crate::ops::Host;
use crate::store::Store;

/// What every connection shares: the store, the exports clients hold open, the shutdown flag.
pub struct Shared {
    pub store: Mutex<Store>,
    pub open_exports: Mutex<HashMap<String, usize>>,
    pub shutdown: AtomicBool,
    pub verbose: bool,
}

impl Shared {
    pub fn new(store: Store, verbose: bool) -> Self {
        Shared {
            store: Mutex::new(store),
            open_exports: Mutex::new(HashMap::new()),
            shutdown: AtomicBool::new(false),
            verbose,
        }
    }

    pub fn lock(&self) -> Result<MutexGuard<'_, Store>, Error> {
        self.store.lock().map_err(|_| {
            Error::Corrupt("the server's store lock was poisoned by a failed request".into())
        })
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

impl Host for Shared {
    fn lock(&self) -> Result<MutexGuard<'_, Store>, Error> {
        Shared::lock(self)
    }

    fn open_count(&self, view: &str) -> usize {
        Shared::open_count(self, view)
    }
}
