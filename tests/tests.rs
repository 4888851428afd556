//! All integration tests, compiled as one binary with shared helpers.
mod util;

mod cli;
mod crash;
mod docs;
mod errors;
mod explore;
mod flip;
mod fuzz_replay;
mod model;
mod nbd;
mod ops;
mod repair;
mod schedule;
mod sockets;
mod tail;
mod tls;
mod upgrade;
