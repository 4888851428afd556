//! The control protocol, version 1 (docs/CONTROL.md): how a [`Request`] reaches a running
//! `snapctl serve` and its [`Reply`] comes back. Both sides live here, so they cannot drift.
//!
//! A frame is a 4-byte little-endian length and that many bytes of JSON (at most
//! [`MAX_REQUEST`] from a client, [`MAX_REPLY`] from a server); a descriptor travels as
//! SCM_RIGHTS on a frame's first byte. The client opens with a [`Hello`], the server answers
//! with a [`Welcome`] (or a refusal, and closes); then each [`Envelope`] gets zero or more
//! [`Message::Progress`] frames and one [`Message::Ok`] or [`Message::Err`] with the same id.

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
/// The largest frame a server accepts from a client (a hello, a request).
pub const MAX_REQUEST: usize = 16 << 20;
/// The largest frame a client accepts from its server: a reply may name every snapshot of the
/// store (`list`: about 300 bytes each, 30 MB at 100,000).
pub const MAX_REPLY: usize = 1 << 30;
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

/// Sends one frame of at most `max` bytes, with `fd` passed on its first byte. A message too
/// long fails with `InvalidInput` before anything is sent.
pub fn send<T: Serialize>(
    sock: &UnixStream,
    msg: &T,
    fd: Option<RawFd>,
    max: usize,
) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    if body.len() > max {
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

/// Receives one frame of at most `max` bytes and the descriptors passed with it. A clean end
/// of stream before a frame starts is `UnexpectedEof`.
pub fn recv<T: for<'de> Deserialize<'de>>(
    sock: &UnixStream,
    max: usize,
) -> io::Result<(T, Vec<OwnedFd>)> {
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
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control message too long",
        ));
    }
    // Grown as the bytes arrive, not allocated from the length: a stream that claims a large
    // frame and ends costs only what it sent.
    let mut body = Vec::new();
    sock.take(len as u64).read_to_end(&mut body)?;
    if body.len() < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the other side closed the connection in the middle of a message",
        ));
    }
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

    /// A reply larger than any request may be (a list of 100,000 snapshots is about 30 MB)
    /// reaches the client; a request that large is refused on both sides.
    #[test]
    fn replies_may_be_larger_than_requests() {
        let (a, b) = UnixStream::pair().expect("a socket pair");
        let names: Vec<String> = (0..1_000_000).map(|i| format!("nightly-{i:012}")).collect();
        let big = Message::Ok {
            id: 7,
            reply: Reply {
                response: Response::Deleted {
                    names: names.clone(),
                    freed_bytes: 0,
                },
                events: vec![],
            },
        };
        let writer = std::thread::spawn(move || send(&a, &big, None, MAX_REPLY).map(|()| a));
        let got = recv::<Message>(&b, MAX_REPLY).map(|(m, _)| m);
        let a = writer
            .join()
            .expect("the writer ran")
            .expect("a large reply is sent");
        match got {
            Ok(Message::Ok { id: 7, reply }) => match reply.response {
                Response::Deleted { names: n, .. } => assert_eq!(n, names),
                other => panic!("another response: {other:?}"),
            },
            other => panic!("the large reply did not arrive: {other:?}"),
        }
        // The same size as a request: the sender refuses it, and so does a server reading one.
        let env = Envelope {
            id: 8,
            request: Request::Create(CreateSpec {
                name: "x".repeat(MAX_REQUEST),
                ..CreateSpec::default()
            }),
        };
        let refused = send(&a, &env, None, MAX_REQUEST).map_err(|e| e.kind());
        assert_eq!(refused, Err(io::ErrorKind::InvalidInput));
        let raw = ((MAX_REQUEST + 1) as u32).to_le_bytes();
        (&a).write_all(&raw).expect("a length is written");
        let r = recv::<Envelope>(&b, MAX_REQUEST)
            .map(|_| ())
            .map_err(|e| e.kind());
        assert_eq!(r, Err(io::ErrorKind::InvalidData));
    }
}
