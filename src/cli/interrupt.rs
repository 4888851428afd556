//! SIGINT and SIGTERM during a long command (export, restore). Without this the process died
//! where it stood, saying nothing and leaving an export's temporary file behind. Instead, a
//! watcher removes the temporary file, says in one line what the interruption left, and exits
//! 128 + the signal's number. Ending the process at any instant is safe for the store (every
//! commit is atomic, and a restore that had begun is finished by the next command), so the
//! watcher may end it from its own thread, as a kill would.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::Error;
use crate::ops::catch::Catch;

/// Watches for SIGINT and SIGTERM until dropped; then the previous handlers are back.
pub struct Watch {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _catch: Catch,
}

impl Watch {
    /// `note` says what an interruption leaves; `remove` is a temporary file to delete first.
    pub fn start(json: bool, note: String, remove: Option<PathBuf>) -> Watch {
        let catch = Catch::new();
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let thread = std::thread::spawn(move || {
            while !d.load(Ordering::SeqCst) {
                if let Some(sig) = crate::ops::catch::caught() {
                    if let Some(tmp) = &remove {
                        let _ = std::fs::remove_file(tmp);
                    }
                    let e = Error::Io {
                        message: format!("interrupted by {}; {note}", sig.as_str()),
                        source: std::io::ErrorKind::Interrupted.into(),
                    };
                    super::report(json, &e);
                    std::process::exit(128 + sig as i32);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Watch {
            done,
            thread: Some(thread),
            _catch: catch,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
