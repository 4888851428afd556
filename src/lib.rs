//! snapctl: point-in-time snapshots for any Linux block device, in userspace.
//!
//! The binary is a thin shell over [`cli::main`]. Modules, one concern each:
//! [`io`] (device I/O engines), [`format`] (the superblock), [`store`] (metadata, catalog,
//! allocation), [`cow`] (the copy-on-write engine), [`names`] (what users type), [`cli`].

pub mod cli;
pub mod codec;
pub mod cow;
pub mod error;
pub mod format;
pub mod io;
pub mod names;
pub mod nbd;
pub mod schedule;
pub mod serve;
pub mod store;
pub mod upgrade;

pub use error::{Error, Result};
