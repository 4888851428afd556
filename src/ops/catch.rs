//! SIGINT and SIGTERM caught for as long as a [`Catch`] lives (while a hook runs, while an export
//! writes its temporary file), so the caller can clean up and say what the interruption left;
//! the handlers that were there before are put back when it goes.

use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

static CAUGHT: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    CAUGHT.store(sig, Ordering::SeqCst);
}

pub struct Catch {
    old: Vec<(Signal, SigAction)>,
}

impl Catch {
    pub fn new() -> Catch {
        CAUGHT.store(0, Ordering::SeqCst);
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
        Catch { old }
    }

    /// The signal that arrived since [`Catch::new`], if one did.
    pub fn caught(&self) -> Option<Signal> {
        caught()
    }
}

/// The signal a live [`Catch`] caught (for a thread that watches on its owner's behalf).
pub fn caught() -> Option<Signal> {
    Signal::try_from(CAUGHT.load(Ordering::SeqCst)).ok()
}

impl Default for Catch {
    fn default() -> Self {
        Catch::new()
    }
}

impl Drop for Catch {
    fn drop(&mut self) {
        for (s, prev) in &self.old {
            // SAFETY: puts back the handler that was there before.
            let _ = unsafe { sigaction(*s, prev) };
        }
    }
}
