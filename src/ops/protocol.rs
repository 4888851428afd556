//! The control protocol, version 1 (docs/CONTROL.md): how a [`Request`] reaches a running
//! `snapctl serve` and its [`Reply`] comes back. Both sides live here, so they cannot drift.
//!
//! A frame is a 4-byte little-endian length and that many bytes of JSON (at most
//! [`MAX_FRAME`]); a descriptor travels as SCM_RIGHTS on a frame's first byte. The client opens
//! with a [`Hello`], the server answers with a [`Welcome`] (or a refusal, and closes);
//! then each [`Envelope`] gets zero or more [`Message::Progress`] frames and one
//! [`Message::Ok`] or [`Message::Err`] with the same id.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use super::{Reply, Request};
use crate::error::WireError;
use crate::store::format::Superblock;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;
/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 16 << 20;
/// What a hello names itself, so a stray connection is told apart from a client.
pub const MAGIC: &str = "snapctl-control";

/// Where sockets live: `$SNAPCTL_RUN_DIR`, default `/run/snapctl`.
pub fn run_dir() -> PathBuf {
    std::env::var_os("SNAPCTL_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/snapctl"))
}

/// The control socket of the server holding the store with this superblock: `<uuid>.ctl`.
pub fn control_path(sb: &Superblock) -> PathBuf {
    run_dir().join(format!("{}.ctl", sb.uuid_string()))
}

/// The default NBD socket of that server: `<uuid>.sock`.
pub fn default_socket(sb: &Superblock) -> PathBuf {
    run_dir().join(format!("{}.sock", sb.uuid_string()))
}

/// The client's first frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub hello: String,
    pub version: u32,
    /// The store the client means, as it named it (for messages).
    pub store: String,
    /// Which file or device that is (`io::file_id`): a copy of a store has the same uuid, so
    /// the uuid that found this server is not enough.
    pub store_id: Option<(u64, u64)>,
}

/// The server's answer to a [`Hello`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Welcome {
    Welcome {
        version: u32,
        /// The snapctl version of the server.
        server: String,
    },
    /// Not this client: another protocol version, or another store than the one served.
    Refused { error: WireError },
}

/// One request, with the id its answers carry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub id: u64,
    pub request: Request,
}

/// What the server sends after the welcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Message {
    Progress { id: u64, done: u64, total: u64 },
    Ok { id: u64, reply: Reply },
    Err { id: u64, error: WireError },
}

/// Sends one frame, with `fd` passed on its first byte.
pub fn send<T: Serialize>(sock: &UnixStream, msg: &T, fd: Option<RawFd>) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    if body.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "control message too long",
        ));
    }
    let len = (body.len() as u32).to_le_bytes();
    let iov = [IoSlice::new(&len), IoSlice::new(&body)];
    let fds: Vec<RawFd> = fd.into_iter().collect();
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let cm: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    let sent = sendmsg::<()>(sock.as_raw_fd(), &iov, cm, MsgFlags::empty(), None)
        .map_err(io::Error::from)?;
    let total = 4 + body.len();
    if sent < total {
        // The rest without the descriptor.
        let mut all = len.to_vec();
        all.extend_from_slice(&body);
        (&*sock).write_all(&all[sent..])?;
    }
    Ok(())
}

/// Receives one frame and the descriptors passed with it. A clean end of stream before a
/// frame starts is `UnexpectedEof`.
pub fn recv<T: for<'de> Deserialize<'de>>(sock: &UnixStream) -> io::Result<(T, Vec<OwnedFd>)> {
    let mut len = [0u8; 4];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut len)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(v) = c {
                // SAFETY: the kernel just gave us these descriptors; we own them now.
                fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        (msg.bytes, fds)
    };
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the other side closed the connection",
        ));
    }
    if n < 4 {
        (&*sock).read_exact(&mut len[n..])?;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control message too long",
        ));
    }
    let mut body = vec![0u8; len];
    (&*sock).read_exact(&mut body)?;
    let msg = serde_json::from_slice(&body).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad control message: {e}"),
        )
    })?;
    Ok((msg, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{CreateSpec, Response};

    /// The wire forms docs/CONTROL.md shows: a change here is a protocol change.
    #[test]
    fn messages_have_the_documented_json_form() {
        let j = |v: serde_json::Value| v.to_string();
        let env = Envelope {
            id: 2,
            request: Request::Create(CreateSpec {
                name: "nightly".into(),
                expires: Some(1796169600),
                ..CreateSpec::default()
            }),
        };
        assert_eq!(
            serde_json::to_string(&env).ok(),
            Some(j(
                serde_json::json!({"id": 2, "request": {"op": "create", "name": "nightly",
                "expires": 1796169600, "labels": {}, "from": null, "writable": false,
                "created": null}})
            ))
        );
        let m = Message::Progress {
            id: 3,
            done: 1,
            total: 2,
        };
        assert_eq!(
            serde_json::to_string(&m).ok(),
            Some(j(
                serde_json::json!({"progress": {"id": 3, "done": 1, "total": 2}})
            ))
        );
        let ok = Message::Ok {
            id: 1,
            reply: Reply {
                response: Response::Deleted {
                    names: vec!["a".into()],
                    freed_bytes: 4096,
                },
                events: vec![],
            },
        };
        assert_eq!(
            serde_json::to_string(&ok).ok(),
            Some(j(serde_json::json!({"ok": {"id": 1, "reply": {"response":
                {"type": "deleted", "names": ["a"], "freed_bytes": 4096}, "events": []}}})))
        );
        let w = Welcome::Welcome {
            version: 1,
            server: "0.1.0".into(),
        };
        assert_eq!(
            serde_json::to_string(&w).ok(),
            Some(j(
                serde_json::json!({"welcome": {"version": 1, "server": "0.1.0"}})
            ))
        );
        for (r, op) in [
            (Request::ResumeRestore, "resume-restore"),
            (Request::SetWritable { name: "x".into() }, "set-writable"),
            (
                Request::RestoreTo {
                    name: "x".into(),
                    target: "/dev/y".into(),
                },
                "restore-to",
            ),
        ] {
            let v = serde_json::to_value(&r).unwrap_or_default();
            assert_eq!(v["op"], op);
        }
    }
}
