//! The pread/pwrite engine, used where io_uring is refused.

use super::*;

/// pread/pwrite engine.
pub struct SyncIo {
    pub(super) file: File,
    pub(super) tail: Tail,
    pub(super) size: u64,
    pub(super) align: usize,
}

impl RawIo for SyncIo {
    fn raw_read(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }
    fn raw_write(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }
}

impl BlockIo for SyncIo {
    file_engine_common!();
    fn engine(&self) -> &'static str {
        if self.align > 1 {
            "sync (pread/pwrite, O_DIRECT)"
        } else {
            "sync (pread/pwrite, buffered)"
        }
    }
}
