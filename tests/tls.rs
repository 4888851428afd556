//! TLS on `serve --listen` (src/server/tls.rs): a CA, server and client certificates made with
//! the openssl CLI, then real clients (nbdinfo, qemu-img, qemu-io through libnbd's and qemu's
//! GnuTLS) and a raw protocol client (rustls) for what they cannot show: each option refused
//! before NBD_OPT_STARTTLS, a second STARTTLS, a presented certificate from the wrong CA.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::nbd::have;
use crate::util::bin;

const ORIGIN: usize = 4 << 20;

fn origin_bytes() -> Vec<u8> {
    (0..ORIGIN).map(|i| (i * 13 % 251) as u8).collect()
}

fn run(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A CA, a server certificate for localhost and 127.0.0.1 signed by it, a client certificate
/// signed by it and one signed by another CA; and, for the clients, directories laid out as
/// libnbd's `tls-certificates=DIR` and qemu's `tls-creds-x509,dir=DIR` read them (ca-cert.pem,
/// client-cert.pem, client-key.pem):
/// - `good`: trusts the CA, presents the right client certificate;
/// - `nocert`: trusts the CA, presents none;
/// - `wrong`: trusts the CA, presents the other CA's client certificate;
/// - `untrusting`: trusts only the other CA (so must refuse the server).
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
        };
        let d = pki.dir.path();
        let openssl = |args: &[&str]| {
            run(Command::new("openssl").args(args).current_dir(d));
        };
        let key = |name: &str| {
            let out = format!("{name}-key.pem");
            openssl(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                &out,
            ]);
        };
        for ca in ["ca", "other-ca"] {
            key(ca);
            openssl(&[
                "req",
                "-x509",
                "-new",
                "-key",
                &format!("{ca}-key.pem"),
                "-subj",
                &format!("/CN=snapctl test {ca}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-days",
                "2",
                "-out",
                &format!("{ca}-cert.pem"),
            ]);
        }
        let ext = |name: &str, text: &str| std::fs::write(d.join(name), text).unwrap();
        ext(
            "server.ext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        );
        ext(
            "client.ext",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
        );
        for (name, cn, ca, ext) in [
            ("server", "localhost", "ca", "server.ext"),
            ("client", "client", "ca", "client.ext"),
            ("intruder", "intruder", "other-ca", "client.ext"),
        ] {
            key(name);
            openssl(&[
                "req",
                "-new",
                "-key",
                &format!("{name}-key.pem"),
                "-subj",
                &format!("/CN={cn}"),
                "-out",
                &format!("{name}.csr"),
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}-cert.pem"),
                "-CAkey",
                &format!("{ca}-key.pem"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                ext,
                "-out",
                &format!("{name}-cert.pem"),
            ]);
        }
        for (dir, ca, client) in [
            ("good", "ca", Some("client")),
            ("nocert", "ca", None),
            ("wrong", "ca", Some("intruder")),
            ("untrusting", "other-ca", Some("client")),
        ] {
            let cd = d.join(dir);
            std::fs::create_dir(&cd).unwrap();
            std::fs::copy(d.join(format!("{ca}-cert.pem")), cd.join("ca-cert.pem")).unwrap();
            if let Some(c) = client {
                std::fs::copy(d.join(format!("{c}-cert.pem")), cd.join("client-cert.pem")).unwrap();
                std::fs::copy(d.join(format!("{c}-key.pem")), cd.join("client-key.pem")).unwrap();
            }
        }
        pki
    }

    fn p(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn s(&self, f: &str) -> String {
        self.p(f).display().to_string()
    }
}

/// A store over a 4 MiB origin of known bytes, and `snapctl serve` on a unix socket and on
/// 127.0.0.1:port with the given extra arguments. Killed on drop, failure or not.
struct TlsServed {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl TlsServed {
    fn start(extra: &[String]) -> TlsServed {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("origin.img"), origin_bytes()).unwrap();
        std::fs::File::create(dir.path().join("store.img"))
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut s = TlsServed {
            dir,
            port,
            child: None,
        };
        run(s
            .cli()
            .args(["init", "store.img", "--origin", "origin.img"]));
        let log = std::fs::File::create(s.p("serve.log")).unwrap();
        let child = s
            .cli()
            .args(["serve", "-v", "--socket"])
            .arg(s.p("nbd.sock"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        s.child = Some(child);
        // The TCP listener is the last socket bound: once it answers, all of them do.
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none() && start.elapsed() < Duration::from_secs(10),
                "server did not start: {}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn p(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.p("serve.log")).unwrap_or_default()
    }

    fn cli(&self) -> Command {
        let mut c = Command::new(bin());
        c.current_dir(self.dir.path())
            .env("SNAPCTL_STORE", self.p("store.img"))
            .env("SNAPCTL_RUN_DIR", self.p("run"));
        c
    }

    /// libnbd's URI for the origin over TLS, with the client files in `certs`.
    fn nbds(&self, certs: &Path) -> String {
        format!(
            "nbds://127.0.0.1:{}/origin?tls-certificates={}",
            self.port,
            certs.display()
        )
    }

    /// qemu's arguments for the origin over TLS, with the client files in `certs`.
    fn qemu(&self, certs: &Path) -> Vec<String> {
        vec![
            "--object".into(),
            format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                certs.display()
            ),
            "--image-opts".into(),
            format!(
                "driver=nbd,host=127.0.0.1,port={},export=origin,tls-creds=tls0",
                self.port
            ),
        ]
    }

    fn nbdinfo(&self, certs: &Path) -> Output {
        Command::new("nbdinfo")
            .arg(self.nbds(certs))
            .output()
            .unwrap()
    }
}

impl Drop for TlsServed {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tls_args(pki: &Pki, client_ca: bool) -> Vec<String> {
    let mut v = vec![
        "--tls-cert".into(),
        pki.s("server-cert.pem"),
        "--tls-key".into(),
        pki.s("server-key.pem"),
    ];
    if client_ca {
        v.extend(["--tls-client-ca".into(), pki.s("ca-cert.pem")]);
    }
    v
}

fn have_all() -> bool {
    have("openssl") && have("nbdinfo") && have("qemu-img") && have("qemu-io")
}

// ---------------------------------------------------------------------------------------------
// A raw client: the option phase byte by byte, over any stream.

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_TLS_REQD: u32 = 0x8000_0005;

/// Reads the greeting and answers with fixed newstyle and no zeroes.
fn hello<S: Read + Write>(s: &mut S) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
}

fn option<S: Write>(s: &mut S, opt: u32, data: &[u8]) {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
    s.flush().unwrap();
}

/// One option reply: (reply type, data), checking it answers `opt`.
fn reply<S: Read>(s: &mut S, opt: u32) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..8], &0x0003_e889_0455_65a9u64.to_be_bytes());
    assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), opt);
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut d).unwrap();
    (kind, d)
}

/// NBD_OPT_GO for `name`: true when it is entered (ACK), false on an error reply.
fn go<S: Read + Write>(s: &mut S, name: &str) -> bool {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    option(s, OPT_GO, &d);
    loop {
        match reply(s, OPT_GO) {
            (REP_INFO, _) => continue,
            (REP_ACK, _) => return true,
            (k, _) => {
                assert!(k & 0x8000_0000 != 0, "unexpected reply {k:#x}");
                return false;
            }
        }
    }
}

/// A simple NBD_CMD_READ of `len` bytes at `off` (no structured replies negotiated).
fn read_block<S: Read + Write>(s: &mut S, off: u64, len: u32) -> Vec<u8> {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes()); // flags
    r.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
    r.extend_from_slice(&7u64.to_be_bytes()); // cookie
    r.extend_from_slice(&off.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    s.write_all(&r).unwrap();
    s.flush().unwrap();
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes());
    assert_eq!(&h[4..8], &[0, 0, 0, 0], "read failed");
    assert_eq!(&h[8..16], &7u64.to_be_bytes());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).unwrap();
    d
}

/// NBD_CMD_DISC.
fn disconnect<S: Write>(s: &mut S) {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&2u16.to_be_bytes());
    r.extend_from_slice(&[0u8; 20]);
    s.write_all(&r).unwrap();
    s.flush().unwrap();
}

/// A rustls client configuration trusting `ca`, presenting `client` (cert, key) if given.
fn rustls_client(pki: &Pki, ca: &str, client: Option<&str>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.p(&format!("{ca}-cert.pem"))).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let cfg = match client {
        None => b.with_no_client_auth(),
        Some(c) => {
            let chain = CertificateDer::pem_file_iter(pki.p(&format!("{c}-cert.pem")))
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_file(pki.p(&format!("{c}-key.pem"))).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
    };
    Arc::new(cfg)
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects, sends NBD_OPT_STARTTLS, and runs the TLS handshake to its end (with TLS 1.3 the
/// server's verdict on a client certificate arrives after it: `handshake` does not see it).
fn starttls(port: u16, cfg: Arc<rustls::ClientConfig>) -> std::io::Result<TlsStream> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    hello(&mut tcp);
    option(&mut tcp, OPT_STARTTLS, &[]);
    assert_eq!(reply(&mut tcp, OPT_STARTTLS).0, REP_ACK);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------------

/// Real clients over TLS: nbdinfo lists the export, qemu-img reads the origin's bytes, a write
/// through qemu-io lands; a plaintext client and a client that does not trust the server's CA
/// are both refused.
#[test]
fn tls_clients_read_and_write_and_others_are_refused() {
    if !have_all() {
        return;
    }
    let pki = Pki::new();
    let s = TlsServed::start(&tls_args(&pki, false));
    assert!(
        s.log()
            .contains(&format!("nbds://127.0.0.1:{}/origin", s.port)),
        "{}",
        s.log()
    );
    // nbdinfo over TLS (no client certificate needed: no --tls-client-ca).
    for certs in ["good", "nocert"] {
        let o = s.nbdinfo(&pki.p(certs));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{certs}: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            s.log()
        );
        assert!(out.contains("with TLS"), "{out}");
        assert!(out.contains("export=\"origin\""), "{out}");
        assert!(out.contains(&format!("export-size: {ORIGIN}")), "{out}");
    }
    // Every byte read through TLS is the origin's.
    let copy = s.p("copy.img");
    let mut c = Command::new("qemu-img");
    c.arg("convert")
        .args(s.qemu(&pki.p("good")))
        .args(["-O", "raw"])
        .arg(&copy);
    run(&mut c);
    assert!(std::fs::read(&copy).unwrap() == origin_bytes());
    // A write through TLS lands on the origin.
    let mut c = Command::new("qemu-io");
    c.args(s.qemu(&pki.p("good")))
        .args(["-c", "write -P 0xab 65536 8192"]);
    run(&mut c);
    let o = run(s.cli().args(["export", "origin"]));
    let mut want = origin_bytes();
    want[65536..65536 + 8192].fill(0xab);
    assert!(o.stdout == want, "the write through TLS did not land");
    // A plaintext client is refused (the server requires TLS): no export, no data.
    let o = Command::new("nbdinfo")
        .arg(format!("nbd://127.0.0.1:{}/origin", s.port))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(!String::from_utf8_lossy(&o.stdout).contains("export-size"));
    // A client that does not trust the server's CA refuses it: it really is TLS, with this
    // certificate.
    let o = s.nbdinfo(&pki.p("untrusting"));
    assert!(!o.status.success());
    assert!(!String::from_utf8_lossy(&o.stdout).contains("export-size"));
    let mut c = Command::new("qemu-img");
    c.arg("info").args(s.qemu(&pki.p("untrusting")));
    assert!(!c.output().unwrap().status.success());
}

/// With --tls-client-ca, only clients presenting a certificate signed by that CA get in.
#[test]
fn client_ca_refuses_clients_without_a_certificate_it_signed() {
    if !have_all() {
        return;
    }
    let pki = Pki::new();
    let s = TlsServed::start(&tls_args(&pki, true));
    let o = s.nbdinfo(&pki.p("good"));
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        s.log()
    );
    let mut c = Command::new("qemu-img");
    c.arg("info").args(s.qemu(&pki.p("good")));
    run(&mut c);
    for certs in ["nocert", "wrong"] {
        let o = s.nbdinfo(&pki.p(certs));
        assert!(!o.status.success(), "{certs} got in");
        assert!(!String::from_utf8_lossy(&o.stdout).contains("export-size"));
        let mut c = Command::new("qemu-img");
        c.arg("info").args(s.qemu(&pki.p(certs)));
        assert!(!c.output().unwrap().status.success(), "{certs} got in");
    }
    // GnuTLS sends no certificate the server's CA list does not name; rustls sends what it is
    // given: the other CA's certificate, presented, is refused as well.
    let refused = |client: Option<&str>| match starttls(s.port, rustls_client(&pki, "ca", client)) {
        Err(_) => true,
        Ok(mut t) => {
            // TLS 1.3: the refusal comes as an alert after the handshake, on the next read
            // (or already on this write).
            let mut opt = IHAVEOPT.to_be_bytes().to_vec();
            opt.extend_from_slice(&OPT_LIST.to_be_bytes());
            opt.extend_from_slice(&0u32.to_be_bytes());
            let mut b = [0u8; 1];
            t.write_all(&opt).and_then(|()| t.flush()).is_err() || !matches!(t.read(&mut b), Ok(1))
        }
    };
    assert!(refused(Some("intruder")));
    assert!(refused(None));
    assert!(!refused(Some("client")));
    let log = s.log();
    assert!(log.contains("TLS handshake with 127.0.0.1"), "{log}");
}

/// FORCEDTLS byte by byte: before STARTTLS every option but STARTTLS and ABORT is refused with
/// NBD_REP_ERR_TLS_REQD and NBD_OPT_EXPORT_NAME closes the connection; inside TLS a second
/// STARTTLS is NBD_REP_ERR_INVALID and the export serves the origin's bytes. The unix socket
/// is plain NBD: STARTTLS there is refused by policy, and the session goes on.
#[test]
fn starttls_protocol_follows_the_spec() {
    if !have("openssl") {
        return;
    }
    let pki = Pki::new();
    let s = TlsServed::start(&tls_args(&pki, false));
    // Before STARTTLS.
    let mut t = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    hello(&mut t);
    option(&mut t, OPT_LIST, &[]);
    assert_eq!(reply(&mut t, OPT_LIST).0, REP_ERR_TLS_REQD);
    option(&mut t, 99, &[]);
    assert_eq!(reply(&mut t, 99).0, REP_ERR_TLS_REQD);
    assert!(!go(&mut t, "origin"));
    option(&mut t, OPT_STARTTLS, b"x");
    assert_eq!(reply(&mut t, OPT_STARTTLS).0, REP_ERR_INVALID);
    option(&mut t, OPT_EXPORT_NAME, b"origin");
    let mut b = [0u8; 8];
    assert!(
        !matches!(t.read(&mut b), Ok(n) if n > 0),
        "NBD_OPT_EXPORT_NAME without TLS was answered"
    );
    // After STARTTLS.
    let mut t = starttls(s.port, rustls_client(&pki, "ca", None)).unwrap();
    option(&mut t, OPT_STARTTLS, &[]);
    assert_eq!(reply(&mut t, OPT_STARTTLS).0, REP_ERR_INVALID);
    assert!(go(&mut t, "origin"));
    assert!(read_block(&mut t, 4096, 65536) == origin_bytes()[4096..4096 + 65536]);
    disconnect(&mut t);
    // The server ends the TLS session cleanly (close_notify): a clean end of stream.
    let mut rest = Vec::new();
    assert_eq!(t.read_to_end(&mut rest).unwrap(), 0);
    // The unix socket.
    let mut u = UnixStream::connect(s.p("nbd.sock")).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    hello(&mut u);
    option(&mut u, OPT_STARTTLS, &[]);
    assert_eq!(reply(&mut u, OPT_STARTTLS).0, REP_ERR_POLICY);
    assert!(go(&mut u, "origin"));
    assert!(read_block(&mut u, 0, 4096) == origin_bytes()[..4096]);
    let log = s.log();
    assert!(log.contains("NBD_OPT_EXPORT_NAME"), "{log}");
}

/// Refusals at start: one line, exit 2, no socket and no run directory left.
#[test]
fn tls_options_are_checked_before_anything_starts() {
    if !have("openssl") {
        return;
    }
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f).display().to_string();
    std::fs::write(dir.path().join("origin.img"), vec![0u8; 1 << 20]).unwrap();
    std::fs::File::create(dir.path().join("store.img"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let init = Command::new(bin())
        .args(["init", &p("store.img"), "--origin", &p("origin.img")])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let (cert, key) = (pki.s("server-cert.pem"), pki.s("server-key.pem"));
    let other_key = pki.s("client-key.pem");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--listen", "10809"], vec!["needs TLS", "--tls-cert"]),
        (
            vec!["--listen", "0.0.0.0:10809", "--no-tls"],
            vec!["--no-tls", "loopback", "0.0.0.0:10809"],
        ),
        (
            vec!["--listen", "[::]:10809", "--no-tls"],
            vec!["--no-tls", "loopback"],
        ),
        (
            vec![
                "--listen",
                "10809",
                "--tls-cert",
                &cert,
                "--tls-key",
                "/nonexistent/key.pem",
            ],
            vec!["--tls-key /nonexistent/key.pem", "No such file"],
        ),
        (
            vec![
                "--listen",
                "10809",
                "--tls-cert",
                &cert,
                "--tls-key",
                &other_key,
            ],
            vec!["not the private key", "--tls-cert"],
        ),
        (
            vec!["--listen", "10809", "--tls-cert", &key, "--tls-key", &key],
            vec!["--tls-cert", "no certificate"],
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &key],
            vec!["only for TCP", "--listen"],
        ),
        (vec!["--no-tls"], vec!["--no-tls is only for TCP"]),
        (
            vec!["--listen", "10809", "--tls-cert", &cert],
            vec!["--tls-cert needs --tls-key"],
        ),
    ];
    for (args, says) in cases {
        let o = Command::new(bin())
            .arg("serve")
            .arg("--socket")
            .arg(p("nbd.sock"))
            .args(&args)
            .env("SNAPCTL_STORE", p("store.img"))
            .env("SNAPCTL_RUN_DIR", p("run"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        for s in says {
            assert!(err.contains(s), "{args:?}: {err} does not say {s}");
        }
        assert!(!dir.path().join("nbd.sock").exists() && !dir.path().join("run").exists());
    }
}
