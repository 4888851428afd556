//! The files a command reads or writes in the caller's process, with the caller's rights: an
//! export's output (all or nothing), a write's input, a restore's target, stdin and stdout.
//! Each is handed to the store as one open descriptor (docs/CONTROL.md).

use std::fs::File;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// An output file written whole or not at all: bytes go to a temporary file in the same
/// directory, which `commit` makes durable and renames over the target. Dropped without a
/// commit (an error part way), the temporary file is removed and the target left as it was.
/// A device (or anything not a regular file) is written in place.
pub struct AtomicOutput {
    pub file: std::fs::File,
    target: PathBuf,
    tmp: Option<PathBuf>,
}

/// The temporary file [`AtomicOutput::create`] writes for `target` (known before it exists, so
/// that whoever must remove it after a signal knows it from the start).
pub fn temporary_for(target: &Path) -> Option<PathBuf> {
    let name = target.file_name()?.to_string_lossy().into_owned();
    Some(target.with_file_name(format!(".{name}.snapctl-{}.tmp", std::process::id())))
}

impl AtomicOutput {
    pub fn create(target: &Path) -> Result<AtomicOutput> {
        let err = |e| Error::io(format!("output {}", target.display()), e);
        let meta = std::fs::metadata(target).ok();
        if meta.as_ref().is_some_and(|m| m.is_dir()) {
            return Err(Error::Invalid(format!(
                "output {} is a directory; give a file name (-o {}/NAME.img)",
                target.display(),
                target.display().to_string().trim_end_matches('/')
            )));
        }
        if meta.is_some_and(|m| !m.is_file()) {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(target)
                .map_err(err)?;
            return Ok(AtomicOutput {
                file,
                target: target.to_path_buf(),
                tmp: None,
            });
        }
        let tmp = temporary_for(target).ok_or_else(|| {
            Error::Invalid(format!("output {} is not a file name", target.display()))
        })?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::NotFound(format!(
                    "output {}: its directory does not exist; create it first or choose another path",
                    target.display()
                )),
                _ => err(e),
            })?;
        Ok(AtomicOutput {
            file,
            target: target.to_path_buf(),
            tmp: Some(tmp),
        })
    }

    pub fn commit(mut self) -> Result<()> {
        let err = |e| Error::io(format!("output {}", self.target.display()), e);
        match self.file.sync_all() {
            // A character device (/dev/null) has nothing to make durable and says EINVAL.
            Err(e) if self.tmp.is_none() && e.raw_os_error() == Some(libc::EINVAL) => {}
            r => r.map_err(err)?,
        }
        if let Some(tmp) = self.tmp.take() {
            if let Err(e) = std::fs::rename(&tmp, &self.target) {
                let _ = std::fs::remove_file(&tmp);
                return Err(err(e));
            }
        }
        Ok(())
    }
}

impl Drop for AtomicOutput {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// stdout as a file of its own, for an image; refused on a terminal unless `json` asks for the
/// document there instead.
pub fn stdout_for_image(json: bool) -> Result<File> {
    let out = std::io::stdout();
    if out.is_terminal() && !json {
        return Err(Error::Invalid(
            "refusing to write a disk image to a terminal; use -o FILE or redirect stdout".into(),
        ));
    }
    let fd = out
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io("stdout", e))?;
    Ok(File::from(fd))
}

/// `write`'s input: FILE, or stdin.
pub fn input(path: Option<&Path>) -> Result<File> {
    match path {
        Some(p) => {
            let f = File::open(p).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    Error::NotFound(format!("input {}: no such file", p.display()))
                }
                _ => Error::io(format!("input {}", p.display()), e),
            })?;
            if f.metadata().is_ok_and(|m| m.is_dir()) {
                return Err(Error::Invalid(format!(
                    "input {} is a directory; give a file, or send the data to stdin",
                    p.display()
                )));
            }
            Ok(f)
        }
        None => std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map(File::from)
            .map_err(|e| Error::io("stdin", e)),
    }
}

/// `restore --to DEVICE`: opened for writing, exclusively when it is a block device (refused
/// while mounted).
pub fn restore_target(dev: &Path) -> Result<File> {
    use std::os::unix::fs::FileTypeExt;
    let not_found = || {
        Error::NotFound(format!(
            "--to {}: no such file or device; give a device, or a file at least the origin's size",
            dev.display()
        ))
    };
    let meta = std::fs::metadata(dev).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => not_found(),
        _ => Error::io(format!("--to {}", dev.display()), e),
    })?;
    if !meta.is_file() && !meta.file_type().is_block_device() {
        return Err(Error::Invalid(format!(
            "--to {} is not a block device or a regular file; give a device, or a file at least the origin's size",
            dev.display()
        )));
    }
    crate::io::open_exclusive(dev).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => not_found(),
        Some(libc::EBUSY) => Error::Busy(format!(
            "--to {} is in use (mounted, or held by another program); unmount it or give another device",
            dev.display()
        )),
        _ => Error::io(format!("--to {}", dev.display()), e),
    })
}
