//! SIGTERM and SIGINT as a flag: `snapctl serve` finishes in-flight requests and exits; a
//! freeze thaws before the process goes.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

static SIGNALED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALED.store(true, Ordering::SeqCst);
}

/// Whether SIGTERM or SIGINT arrived since [`install`].
pub fn stop_requested() -> bool {
    SIGNALED.load(Ordering::SeqCst)
}

/// SIGTERM and SIGINT set a flag instead of killing the process; SIGPIPE is ignored.
pub fn install() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let sa = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for s in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(s, &sa) }.map_err(|e| Error::io("signal handler", e.into()))?;
    }
    // A client that vanishes must not kill the server.
    let ign = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: ignoring SIGPIPE.
    unsafe { sigaction(Signal::SIGPIPE, &ign) }
        .map_err(|e| Error::io("signal handler", e.into()))?;
    Ok(())
}
