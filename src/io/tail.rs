//! The partial last block of a file or device, served without O_DIRECT.

use super::*;

/// The bytes of a file or device past its last whole aligned block, served by buffered
/// pread/pwrite so that nothing is ever read or written past the end (and a file's size never
/// changes). `start` is the first byte of that partial block; requests are split there.
pub(super) struct Tail {
    file: Option<File>,
    start: u64,
}

impl Tail {
    pub(super) fn new(file: Option<File>, size: u64, align: usize) -> Tail {
        if align <= 1 || size % align as u64 == 0 {
            return Tail {
                file: None,
                start: size,
            };
        }
        Tail {
            file,
            start: size - size % align as u64,
        }
    }
    /// Whether `off..off+n` reaches into the partial last block.
    pub(super) fn touches(&self, off: u64, n: usize) -> bool {
        self.file.is_some() && off + n as u64 > self.start
    }
    /// Splits a request at `start`: the aligned head (may be empty) and the tail's part.
    pub(super) fn split(&self, off: u64, n: usize) -> usize {
        if off >= self.start {
            0
        } else {
            ((self.start - off) as usize).min(n)
        }
    }
    pub(super) fn file(&self) -> io::Result<&File> {
        self.file
            .as_ref()
            .ok_or_else(|| io::Error::other("no descriptor for the device's tail"))
    }
}

/// What both file engines do the same way: size, range checks, the bounce path, fdatasync.
macro_rules! file_engine_common {
    () => {
        fn len(&self) -> u64 {
            self.size
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
            check_range(self.size, off, buf.len())?;
            if self.tail.touches(off, buf.len()) {
                let (head, rest) = buf.split_at_mut(self.tail.split(off, buf.len()));
                if !head.is_empty() {
                    bounced_read(self, self.align, head, off)?;
                }
                return self
                    .tail
                    .file()?
                    .read_exact_at(rest, off + head.len() as u64);
            }
            bounced_read(self, self.align, buf, off)
        }
        fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            check_range(self.size, off, buf.len())?;
            if self.tail.touches(off, buf.len()) {
                let (head, rest) = buf.split_at(self.tail.split(off, buf.len()));
                if !head.is_empty() {
                    bounced_write(self, self.align, head, off)?;
                }
                return self
                    .tail
                    .file()?
                    .write_all_at(rest, off + head.len() as u64);
            }
            bounced_write(self, self.align, buf, off)
        }
        fn holes(&self, off: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
            file_holes(&self.file, off, off.saturating_add(len).min(self.size))
        }
        fn will_need(&self, off: u64, len: u64) {
            use std::os::unix::io::AsRawFd;
            // Only a hint: its failure changes nothing but the speed.
            // SAFETY: posix_fadvise reads no memory of ours; the descriptor is open.
            let _ = unsafe {
                libc::posix_fadvise(
                    self.file.as_raw_fd(),
                    off as libc::off_t,
                    len as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                )
            };
        }
        fn flush(&self) -> io::Result<()> {
            // One inode: fdatasync through either descriptor covers both paths' writes.
            self.file.sync_data()
        }
    };
}
