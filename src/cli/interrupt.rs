//! SIGINT and SIGTERM during a long command (export, restore). Without this the process died
//! where it stood, saying nothing and leaving an export's temporary file behind. Instead, a
//! watcher removes the temporary file, says in one line what the interruption left, and exits
//! 128 + the signal's number. Ending the process at any instant is safe for the store (every
//! commit is atomic, and a restore that had begun is finished by the next command), so the
//! watcher may end it from its own thread, as a kill would.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use crate::error::Error;

static CAUGHT: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    CAUGHT.store(sig, Ordering::SeqCst);
}

/// Watches for SIGINT and SIGTERM until dropped; then the previous handlers are back.
pub struct Watch {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    old: Vec<(Signal, SigAction)>,
}

impl Watch {
    /// `note` says what an interruption leaves; `remove` is a temporary file to delete first.
    pub fn start(json: bool, note: String, remove: Option<PathBuf>) -> Watch {
        let sa = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::empty(),
            SigSet::empty(),
        );
        let mut old = Vec::new();
        for s in [Signal::SIGINT, Signal::SIGTERM] {
            // SAFETY: the handler only stores to an atomic.
            if let Ok(prev) = unsafe { sigaction(s, &sa) } {
                old.push((s, prev));
            }
        }
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let thread = std::thread::spawn(move || {
            while !d.load(Ordering::SeqCst) {
                let sig = CAUGHT.load(Ordering::SeqCst);
                if sig != 0 {
                    if let Some(tmp) = &remove {
                        let _ = std::fs::remove_file(tmp);
                    }
                    let name = Signal::try_from(sig)
                        .map(|s| s.as_str())
                        .unwrap_or("a signal");
                    let e = Error::Io {
                        message: format!("interrupted by {name}; {note}"),
                        source: std::io::ErrorKind::Interrupted.into(),
                    };
                    super::report(json, &e);
                    std::process::exit(128 + sig);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Watch {
            done,
            thread: Some(thread),
            old,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for (s, prev) in &self.old {
            // SAFETY: puts back the handler that was there before.
            let _ = unsafe { sigaction(*s, prev) };
        }
    }
}
