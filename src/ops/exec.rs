//! [`exec`]: one request against one store. The same code runs in a command's own process and
//! inside `snapctl serve`; only the [`Host`] differs.

use std::fs::File;
use std::io::{Read, Write};

use super::{Data, Host, Progress, Reply, Request, Response, StoreInfo};
use crate::error::{Error, Result};
use crate::store::format::FORMAT_VERSION;
use crate::store::Store;

/// Runs `req`. `data` is the descriptor the request needs (see [`Request::takes_data`]);
/// `progress` hears (done, total) bytes of long operations.
pub fn exec(host: &dyn Host, req: Request, data: Data, progress: Progress<'_>) -> Result<Reply> {
    let need = |d: Data, what: &str| {
        d.ok_or_else(|| Error::Invalid(format!("{what} needs a descriptor beside the request")))
    };
    let mut events = Vec::new();
    let response = match req {
        Request::Info => info(&*host.lock()?)?,
        Request::List => {
            let s = host.lock()?;
            Response::List {
                store: s.name.clone(),
                chunk_size: s.sb.chunk_size,
                snapshots: s.snapshots().cloned().collect(),
            }
        }
        Request::Show { name } => {
            let s = host.lock()?;
            Response::Snapshot {
                snapshot: s.snapshot(&name)?.clone(),
                chunk_size: s.sb.chunk_size,
            }
        }
        Request::Create(c) => {
            crate::names::validate(&c.name)?;
            // The command line checks labels too, but a control client need not be snapctl.
            for (k, v) in &c.labels {
                crate::names::validate_label(k, v).map_err(Error::Invalid)?;
            }
            let mut s = host.lock()?;
            let snap = match &c.from {
                Some(f) => s.create_from(&c.name, f, c.expires, c.labels, c.writable)?,
                None if c.writable => s.create_writable(&c.name, c.expires, c.labels)?,
                None => s.create(&c.name, c.expires, c.labels, c.created)?,
            };
            Response::Snapshot {
                snapshot: snap,
                chunk_size: s.sb.chunk_size,
            }
        }
        Request::SetWritable { name } => {
            let mut s = host.lock()?;
            let snap = s.set_writable(&name)?;
            Response::Snapshot {
                snapshot: snap,
                chunk_size: s.sb.chunk_size,
            }
        }
        Request::Rename { old, new } => {
            crate::names::validate(&new)?;
            let mut s = host.lock()?;
            let snap = s.rename(&old, &new)?;
            Response::Snapshot {
                snapshot: snap,
                chunk_size: s.sb.chunk_size,
            }
        }
        Request::Delete { names, force } => {
            if !force {
                for n in &names {
                    let open = host.open_count(n);
                    if open > 0 {
                        return Err(Error::Busy(format!(
                            "snapshot '{n}' is open by {open} NBD client(s); disconnect them, or use --force"
                        )));
                    }
                }
            }
            let freed_bytes = host.lock()?.delete(&names)?;
            Response::Deleted { names, freed_bytes }
        }
        Request::Export { name } => {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, need(data, "export")?);
            let bytes = stream_view(host, &name, progress, &mut |_, b| {
                out.write_all(b).map_err(|e| Error::io("export output", e))
            })?;
            out.flush().map_err(|e| Error::io("export output", e))?;
            Response::Exported { name, bytes }
        }
        Request::Write { offset, snapshot } => {
            let src = need(data, "write")?;
            let mut s = host.lock()?;
            let res = write(&mut s, offset, snapshot.as_deref(), src);
            events.append(&mut s.events);
            let bytes = res?;
            Response::Written {
                offset,
                bytes,
                snapshot,
            }
        }
        Request::Diff { from, to } => {
            let mut s = host.lock()?;
            let (cs, size) = (s.sb.chunk_size, s.sb.origin_size);
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for c in s.diff_chunks(&from, &to)? {
                let (off, len) = (c * cs, cs.min(size - c * cs));
                match ranges.last_mut() {
                    Some((o, l)) if *o + *l == off => *l += len,
                    _ => ranges.push((off, len)),
                }
            }
            Response::Diff {
                from,
                to,
                chunk_size: cs,
                ranges,
            }
        }
        Request::Restore {
            name,
            backup,
            force,
        } => {
            let open = host.open_count("origin");
            if open > 0 && !force {
                return Err(Error::Busy(format!(
                    "the origin is open by {open} NBD client(s): a mounted filesystem would be corrupted under a restore; disconnect them, or use --force"
                )));
            }
            let mut s = host.lock()?;
            s.snapshot(&name)?;
            let backup = backup.then(|| backup_name(&s));
            let res = s.restore(&name, backup.as_deref(), progress);
            events.append(&mut s.events);
            Response::Restored {
                name,
                backup,
                written_bytes: res?,
            }
        }
        Request::ResumeRestore => Response::Resumed {
            restore: host.lock()?.resumed_restore.clone(),
        },
        Request::RestoreTo { name, target } => {
            let dst = need(data, "restore --to")?;
            let written_bytes = restore_to(host, &name, &target, dst, progress)?;
            Response::RestoredTo {
                name,
                target,
                written_bytes,
            }
        }
        Request::Check {
            data,
            repair,
            drop_damaged,
        } => {
            if drop_damaged && !repair {
                return Err(Error::Invalid(
                    "--drop-damaged needs --repair: `snapctl check --repair --drop-damaged`".into(),
                ));
            }
            let mut s = host.lock()?;
            let report = if repair {
                s.repair(data, drop_damaged, progress)?
            } else {
                s.check_with(data, progress)?
            };
            Response::Checked {
                store: s.name.clone(),
                report,
            }
        }
    };
    Ok(Reply { response, events })
}

fn info(s: &Store) -> Result<Response> {
    let sb = &s.sb;
    let cap = sb.data_chunks * sb.chunk_size;
    Ok(Response::Info(StoreInfo {
        format_version: FORMAT_VERSION,
        uuid: sb.uuid_string(),
        store: s.name.clone(),
        origin: sb.origin_path.clone(),
        origin_size: sb.origin_size,
        chunk_size: sb.chunk_size,
        capacity_bytes: cap,
        used_bytes: s.used_chunks()? * sb.chunk_size,
        snapshot_count: s.snapshots().count() as u64,
        on_full: sb.on_full.name().to_string(),
        io_engine: s.engine().to_string(),
        events: s.recent_events(10)?,
    }))
}

/// The first free `pre-restore-<time>[-k]` name.
fn backup_name(s: &Store) -> String {
    let base = format!(
        "pre-restore-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    );
    let mut b = base.clone();
    let mut k = 1;
    while s.snapshot(&b).is_ok() {
        k += 1;
        b = format!("{base}-{k}");
    }
    b
}

/// `write`: the source until its end, 1 MiB at a time; returns the bytes written.
fn write(s: &mut Store, offset: u64, snapshot: Option<&str>, mut src: File) -> Result<u64> {
    if let Some(sn) = snapshot {
        if !s.snapshot(sn)?.writable {
            return Err(Error::Invalid(format!(
                "snapshot '{sn}' is read-only; `snapctl set-writable {sn}` makes it writable"
            )));
        }
    }
    let size = s.sb.origin_size;
    if offset > size {
        return Err(Error::Invalid(format!(
            "--offset {offset} is beyond the end of the origin ({size} bytes)"
        )));
    }
    // An input of known length (a file) that cannot fit is refused before anything is written;
    // only a stream (a pipe) can be found too long part way.
    if let Ok(m) = src.metadata() {
        use std::io::Seek;
        let left = m.len().saturating_sub(src.stream_position().unwrap_or(0));
        if m.is_file() && offset.saturating_add(left) > size {
            return Err(Error::Invalid(format!(
                "the input is {left} bytes: at --offset {offset} it would run past the end of the origin ({size} bytes); nothing was written"
            )));
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = offset;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match src.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("input", e)),
            }
        }
        if n == 0 {
            break;
        }
        if pos + n as u64 > size {
            return Err(Error::Invalid(format!(
                "the input runs past the end of the origin ({size} bytes); {} bytes were written",
                pos - offset
            )));
        }
        match snapshot {
            Some(sn) => s.write_snapshot(sn, &[(pos, &buf[..n])], false)?,
            None => s.write_origin(pos, &buf[..n], false)?,
        }
        pos += n as u64;
    }
    s.flush()?;
    Ok(pos - offset)
}

/// Reads a whole view in 4 MiB steps, handing each to `write(offset, bytes)`, locking the store
/// once per step. Returns the bytes read.
fn stream_view(
    host: &dyn Host,
    name: &str,
    progress: Progress<'_>,
    write: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<u64> {
    let (total, chunk) = {
        let s = host.lock()?;
        if name != "origin" {
            s.snapshot(name)?;
        }
        (s.sb.origin_size, s.sb.chunk_size)
    };
    let step = (4u64 << 20).max(chunk);
    let mut buf = crate::io::AlignedBuf::new(step as usize);
    let mut off = 0;
    progress(0, total);
    while off < total {
        let n = step.min(total - off) as usize;
        host.lock()?
            .read_view(name, off, &mut buf.as_mut_slice()[..n])?;
        write(off, &buf.as_slice()[..n])?;
        off += n as u64;
        progress(off, total);
    }
    Ok(total)
}

/// `restore NAME --to`: the snapshot's image onto a device or file the caller opened.
fn restore_to(
    host: &dyn Host,
    name: &str,
    what: &str,
    target: File,
    progress: Progress<'_>,
) -> Result<u64> {
    let (origin, store, size) = {
        let s = host.lock()?;
        s.snapshot(name)?;
        (
            crate::io::file_id(std::path::Path::new(&s.sb.origin_path)),
            crate::io::file_id(std::path::Path::new(&s.name)),
            s.sb.origin_size,
        )
    };
    let dev = crate::io::device_of(target).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput => Error::Invalid(format!(
            "--to {what} is not a block device or a regular file; give a device, or a file at least the origin's size"
        )),
        _ => Error::io(format!("--to {what}"), e),
    })?;
    let id = crate::io::file_id_of(&dev.file);
    if id.is_some() && (id == origin || id == store) {
        return Err(Error::Invalid(format!(
            "--to {what} is the origin or the store; give another device or file (or restore without --to)"
        )));
    }
    if dev.size < size {
        return Err(Error::Invalid(format!(
            "--to {what} holds {} bytes, less than the origin's {size}; give a device or file of at least {size} bytes",
            dev.size
        )));
    }
    let io = crate::io::engine_for(dev, crate::io::EngineChoice::from_env())
        .map_err(|e| Error::io(format!("--to {what}"), e))?;
    let werr = |e| Error::io(format!("--to {what}: write"), e);
    let total = stream_view(host, name, progress, &mut |off, data| {
        io.write_at(data, off).map_err(werr)
    })?;
    io.flush().map_err(werr)?;
    Ok(total)
}
