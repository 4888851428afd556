//! snapctl: point-in-time snapshots for any Linux block device, in userspace.
//!
//! The binary is a thin shell over [`cli::main`]. Data flows one way, and each module has one
//! concern (docs/DESIGN.md has the picture):
//!
//! - [`cli`]: what users type and what they see (arguments, rendering, man pages);
//! - [`ops`]: every operation as a typed request, the client that runs it here or in a server,
//!   consistent create, schedules and retention;
//! - [`server`]: `snapctl serve`, the NBD protocol and the control socket, another caller of
//!   [`ops`];
//! - [`store`]: the store on disk: superblock ([`store::format`]), metadata region, catalog,
//!   allocator, value layouts ([`store::codec`]), the copy-on-write engine ([`store::cow`]),
//!   upgrades;
//! - [`io`]: device I/O engines;
//! - [`names`], [`error`], [`signals`], [`profile`]: shared vocabulary.

pub mod cli;
pub mod error;
#[cfg(feature = "testing")]
pub mod fuzzing;
pub mod io;
pub mod names;
pub mod ops;
pub mod profile;
pub mod server;
pub mod signals;
pub mod store;

pub use error::{Error, Result};
