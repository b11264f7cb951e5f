//! `NlmClient`: the client side of NFSv3's lock protocol, NLM 4 (program 100021 version 4, from the Open
//! Group's XNFS and RFC 1813's companion), over ONC RPC on TCP, so advisory locks taken through a FUSE mount
//! are taken on the server and hold against every other client of the export.
//!
//! It owns the few messages locks need (TEST, NM_LOCK, UNLOCK, FREE_ALL), their XDR form, ONC RPC record
//! marking with AUTH_UNIX credentials, and finding the lock manager's port (configured, or asked of the
//! server's portmapper). `nfs3_client` has no generic RPC call, hence the small codec here.
//!
//! Choices, and why:
//! - Locks are taken with NM_LOCK, the non-monitored LOCK: a monitored LOCK makes the server register the
//!   client with its status monitor (statd), and NFS-Ganesha refuses every monitored lock (DENIED_NOLOCKS)
//!   when no statd runs on the server host. Nothing here would answer a status notification anyway (the
//!   client has no statd): cleaning up after a client that died is done by the caller (see `nfs::locks`).
//! - Never `block = true`: a blocked request is granted later by a GRANTED call back to the client, which
//!   would need an RPC server here. Callers poll with non-blocking requests instead.
//! - One TCP connection, one call at a time, every call under the deadline (connecting included); after any
//!   failure the connection is dropped, so a late reply can never be taken for the next call's.
//!
//! It must not decide lock policy (waiting, owners, what to do without a lock manager): `nfs::locks` does.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The NLM program and the version that carries 64-bit offsets.
const NLM_PROG: u32 = 100021;
const NLM_VERS: u32 = 4;
const PROC_TEST: u32 = 1;
const PROC_UNLOCK: u32 = 4;
const PROC_NM_LOCK: u32 = 22;
const PROC_FREE_ALL: u32 = 23;
/// The portmapper (rpcbind's version 2 protocol), always on port 111.
const PMAP_PROG: u32 = 100000;
const PMAP_VERS: u32 = 2;
const PMAP_GETPORT: u32 = 3;
const PMAP_PORT: u16 = 111;
const IPPROTO_TCP: u32 = 6;
/// Replies larger than this are nonsense for these messages (a holder is well under 2 KiB).
const MAX_REPLY: usize = 64 * 1024;
/// NLM 4's limit on a caller name (LM_MAXSTRLEN).
pub const MAX_CALLER_NAME: usize = 1024;

/// What went wrong talking to the lock manager.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NlmError {
    /// The server has no NLM 4 over TCP: the portmapper does not know it, or nothing listens on the port.
    #[error("the nfs server {server} has no lock manager (NLM 4 over TCP): {why}")]
    Absent { server: IpAddr, why: String },
    #[error("the lock manager of {server} did not answer within {secs:.1} s")]
    TimedOut { server: IpAddr, secs: f64 },
    #[error("talking to the lock manager of {server} failed: {why}")]
    Io { server: IpAddr, why: String },
    /// The server answered, and refused with this NLM status (other than GRANTED or DENIED).
    #[error("the lock manager of {server} refused: {}", describe_stat(*.stat))]
    Refused { server: IpAddr, stat: u32 },
}

/// NLM 4 status codes as words.
pub fn describe_stat(stat: u32) -> &'static str {
    match stat {
        0 => "granted",
        1 => "denied: a conflicting lock is held",
        2 => "denied: the server has no resources for locks (no status monitor, or out of memory)",
        3 => "blocked",
        4 => "denied: the server is in its grace period after a restart; try again shortly",
        5 => "deadlock",
        6 => "the file system is read-only",
        7 => "stale file handle",
        8 => "offset or length too big",
        9 => "failed",
        _ => "unknown status",
    }
}

/// NLM status codes that matter to callers.
pub const NLM4_GRANTED: u32 = 0;
pub const NLM4_DENIED: u32 = 1;
pub const NLM4_DENIED_GRACE_PERIOD: u32 = 4;
pub const NLM4_STALE_FH: u32 = 7;

/// One lock as NLM names it: whose, on which file, which bytes. `len == 0` means "to the end of the file,
/// however long it grows".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NlmLock {
    pub caller_name: String,
    pub fh: Vec<u8>,
    /// The owner handle: which lock owner of this caller.
    pub oh: Vec<u8>,
    /// The owner's "process id": servers such as Linux knfsd tell owners apart by it alone.
    pub svid: i32,
    pub offset: u64,
    pub len: u64,
}

/// A lock that TEST found in the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NlmHolder {
    pub exclusive: bool,
    pub svid: i32,
    pub oh: Vec<u8>,
    pub offset: u64,
    pub len: u64,
}

/// Where to reach the lock manager, and as whom.
#[derive(Debug, Clone)]
pub struct NlmConfig {
    pub server: IpAddr,
    /// The lock manager's TCP port; None asks the server's portmapper.
    pub port: Option<u16>,
    pub timeout: Duration,
    /// AUTH_UNIX identity of every call.
    pub uid: u32,
    pub gid: u32,
}

/// A client for one server's lock manager. Calls are serialised on one connection.
#[derive(Debug)]
pub struct NlmClient {
    config: NlmConfig,
    conn: tokio::sync::Mutex<Option<TcpStream>>,
    xid: AtomicU32,
    machine: String,
}

impl NlmClient {
    pub fn new(config: NlmConfig) -> Self {
        let machine = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "ferry".into());
        // Distinct first xids per process, so a server's duplicate-request cache never confuses two clients.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id().rotate_left(16);
        Self {
            config,
            conn: tokio::sync::Mutex::new(None),
            xid: AtomicU32::new(seed),
            machine,
        }
    }

    pub fn server(&self) -> IpAddr {
        self.config.server
    }

    /// Whether `lock` could be taken now; the conflicting lock if not.
    pub async fn test(
        &self,
        lock: &NlmLock,
        exclusive: bool,
    ) -> Result<Option<NlmHolder>, NlmError> {
        let mut args = Xdr::default();
        args.opaque(&self.cookie());
        args.bool(exclusive);
        args.lock(lock);
        let reply = self.call(PROC_TEST, args).await?;
        let mut r = Reader::new(&reply);
        let parsed = (|| {
            let _cookie = r.opaque()?;
            let stat = r.u32()?;
            if stat != NLM4_DENIED {
                return Some(Err(stat));
            }
            let holder = NlmHolder {
                exclusive: r.bool()?,
                svid: r.u32()? as i32,
                oh: r.opaque()?,
                offset: r.u64()?,
                len: r.u64()?,
            };
            Some(Ok(holder))
        })();
        match parsed {
            Some(Ok(holder)) => Ok(Some(holder)),
            Some(Err(NLM4_GRANTED)) => Ok(None),
            Some(Err(stat)) => Err(self.refused(stat)),
            None => Err(self.garbled("TEST")),
        }
    }

    /// Tries to take `lock` without waiting: Ok(true) when granted, Ok(false) when another lock is in the way.
    pub async fn lock(&self, lock: &NlmLock, exclusive: bool) -> Result<bool, NlmError> {
        let mut args = Xdr::default();
        args.opaque(&self.cookie());
        args.bool(false); // block: never, see the module's notes
        args.bool(exclusive);
        args.lock(lock);
        args.bool(false); // reclaim
        args.u32(0); // state: the client's status-monitor state; unused without monitoring
        match self.res(PROC_NM_LOCK, args, "NM_LOCK").await? {
            NLM4_GRANTED => Ok(true),
            NLM4_DENIED => Ok(false),
            stat => Err(self.refused(stat)),
        }
    }

    /// Releases `lock`'s bytes held by its owner (granted even when nothing was held).
    pub async fn unlock(&self, lock: &NlmLock) -> Result<(), NlmError> {
        let mut args = Xdr::default();
        args.opaque(&self.cookie());
        args.lock(lock);
        match self.res(PROC_UNLOCK, args, "UNLOCK").await? {
            NLM4_GRANTED => Ok(()),
            stat => Err(self.refused(stat)),
        }
    }

    /// Asks the server to drop every lock of `caller_name`. Servers differ in what they drop: NFS-Ganesha,
    /// unless it is set to use caller names, drops every lock of the calling host's address.
    pub async fn free_all(&self, caller_name: &str) -> Result<(), NlmError> {
        let mut args = Xdr::default();
        args.string(caller_name);
        args.u32(0);
        self.call(PROC_FREE_ALL, args).await.map(|_| ())
    }

    /// Calls a procedure whose reply is an `nlm4_res` (cookie, status) and returns the status.
    async fn res(&self, proc_: u32, args: Xdr, name: &str) -> Result<u32, NlmError> {
        let reply = self.call(proc_, args).await?;
        let mut r = Reader::new(&reply);
        r.opaque()
            .and_then(|_| r.u32())
            .ok_or_else(|| self.garbled(name))
    }

    fn cookie(&self) -> Vec<u8> {
        self.xid.load(Ordering::Relaxed).to_be_bytes().to_vec()
    }

    fn refused(&self, stat: u32) -> NlmError {
        NlmError::Refused {
            server: self.config.server,
            stat,
        }
    }

    fn garbled(&self, what: &str) -> NlmError {
        NlmError::Io {
            server: self.config.server,
            why: format!("the reply to {what} is malformed"),
        }
    }

    fn timed_out(&self) -> NlmError {
        NlmError::TimedOut {
            server: self.config.server,
            secs: self.config.timeout.as_secs_f64(),
        }
    }

    /// One NLM call under the deadline: connects (finding the port) when no connection is open.
    async fn call(&self, proc_: u32, args: Xdr) -> Result<Vec<u8>, NlmError> {
        let mut conn = self.conn.lock().await;
        let attempt = async {
            if conn.is_none() {
                *conn = Some(self.connect().await?);
            }
            let Some(stream) = conn.as_mut() else {
                return Err(self.io("no connection".into()));
            };
            let xid = self.xid.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            let message = call_message(
                xid,
                NLM_PROG,
                NLM_VERS,
                proc_,
                &self.machine,
                self.config.uid,
                self.config.gid,
                &args.0,
            );
            exchange(stream, &message, xid)
                .await
                .map_err(|why| self.io(why))
        };
        let result = match tokio::time::timeout(self.config.timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(self.timed_out()),
        };
        if result.is_err() {
            // The stream may hold half a reply, or a reply still coming: never reuse it.
            *conn = None;
        }
        result
    }

    fn io(&self, why: String) -> NlmError {
        NlmError::Io {
            server: self.config.server,
            why,
        }
    }

    fn absent(&self, why: String) -> NlmError {
        NlmError::Absent {
            server: self.config.server,
            why,
        }
    }

    async fn connect(&self) -> Result<TcpStream, NlmError> {
        let port = match self.config.port {
            Some(p) => p,
            None => self.port_from_portmapper().await?,
        };
        let stream = TcpStream::connect(SocketAddr::new(self.config.server, port))
            .await
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    self.absent(format!("nothing listens on port {port}"))
                } else {
                    self.io(format!("cannot connect to port {port}: {e}"))
                }
            })?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// GETPORT of NLM 4 over TCP from the server's portmapper; 0 there means "not registered".
    async fn port_from_portmapper(&self) -> Result<u16, NlmError> {
        let mut stream = TcpStream::connect(SocketAddr::new(self.config.server, PMAP_PORT))
            .await
            .map_err(|e| {
                self.absent(format!(
                    "cannot reach its portmapper on port {PMAP_PORT} ({e}); set nfs.nlm_port"
                ))
            })?;
        let mut args = Xdr::default();
        args.u32(NLM_PROG);
        args.u32(NLM_VERS);
        args.u32(IPPROTO_TCP);
        args.u32(0);
        let xid = self.xid.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let message = call_message(xid, PMAP_PROG, PMAP_VERS, PMAP_GETPORT, "", 0, 0, &args.0);
        let reply = exchange(&mut stream, &message, xid)
            .await
            .map_err(|why| self.io(format!("portmapper: {why}")))?;
        match Reader::new(&reply).u32() {
            Some(0) => Err(self.absent("its portmapper does not list NLM 4 over TCP".into())),
            Some(port) => {
                u16::try_from(port).map_err(|_| self.io(format!("the portmapper gave port {port}")))
            }
            None => Err(self.garbled("GETPORT")),
        }
    }
}

/// Sends one record and reads the reply to `xid`, returning the procedure's results.
async fn exchange(stream: &mut TcpStream, message: &[u8], xid: u32) -> Result<Vec<u8>, String> {
    let mut framed = Vec::with_capacity(message.len() + 4);
    // One fragment, marked last (the high bit).
    framed.extend_from_slice(&(0x8000_0000 | message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    stream
        .write_all(&framed)
        .await
        .map_err(|e| format!("cannot send: {e}"))?;
    loop {
        let record = read_record(stream).await?;
        match parse_reply(&record, xid)? {
            Some(results) => return Ok(results),
            // A reply to an earlier call of this connection (it cannot be: failures drop it); skip it.
            None => continue,
        }
    }
}

/// One record: fragments until the one marked last.
async fn read_record(stream: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut record = Vec::new();
    loop {
        let mut header = [0u8; 4];
        stream
            .read_exact(&mut header)
            .await
            .map_err(|e| format!("cannot read the reply: {e}"))?;
        let word = u32::from_be_bytes(header);
        let len = (word & 0x7fff_ffff) as usize;
        if record.len() + len > MAX_REPLY {
            return Err(format!("a reply of more than {MAX_REPLY} bytes"));
        }
        let start = record.len();
        record.resize(start + len, 0);
        stream
            .read_exact(&mut record[start..])
            .await
            .map_err(|e| format!("cannot read the reply: {e}"))?;
        if word & 0x8000_0000 != 0 {
            return Ok(record);
        }
    }
}

/// The results of an accepted, successful reply to `xid`; None for a reply to another xid.
fn parse_reply(record: &[u8], xid: u32) -> Result<Option<Vec<u8>>, String> {
    let mut r = Reader::new(record);
    let bad = || "a malformed RPC reply".to_string();
    if r.u32().ok_or_else(bad)? != xid {
        return Ok(None);
    }
    if r.u32().ok_or_else(bad)? != 1 {
        return Err("an RPC message that is not a reply".into());
    }
    match r.u32().ok_or_else(bad)? {
        0 => {}
        1 => {
            return Err(match r.u32() {
                Some(0) => "the server refused the RPC version".into(),
                Some(1) => format!(
                    "the server refused the credentials (auth status {})",
                    r.u32().unwrap_or(0)
                ),
                _ => bad(),
            })
        }
        _ => return Err(bad()),
    }
    // The verifier, then the accept status.
    let _flavor = r.u32().ok_or_else(bad)?;
    let _body = r.opaque().ok_or_else(bad)?;
    match r.u32().ok_or_else(bad)? {
        0 => Ok(Some(r.rest().to_vec())),
        1 => Err("the program is not served there".into()),
        2 => Err("the program version is not served there".into()),
        3 => Err("the procedure is not served there".into()),
        4 => Err("the server could not decode the arguments".into()),
        _ => Err("the server failed the call (system error)".into()),
    }
}

/// An RPC call message: header, AUTH_UNIX credentials (AUTH_NONE when `machine` is empty), no verifier.
#[allow(clippy::too_many_arguments)]
fn call_message(
    xid: u32,
    prog: u32,
    vers: u32,
    proc_: u32,
    machine: &str,
    uid: u32,
    gid: u32,
    args: &[u8],
) -> Vec<u8> {
    let mut m = Xdr::default();
    m.u32(xid);
    m.u32(0); // CALL
    m.u32(2); // RPC version
    m.u32(prog);
    m.u32(vers);
    m.u32(proc_);
    if machine.is_empty() {
        m.u32(0);
        m.u32(0);
    } else {
        let mut cred = Xdr::default();
        cred.u32(0); // stamp
                     // RFC 5531 bounds the machine name at 255 bytes.
        let name: String = machine.chars().take(255).collect();
        cred.string(&name);
        cred.u32(uid);
        cred.u32(gid);
        cred.u32(1);
        cred.u32(gid);
        m.u32(1); // AUTH_UNIX
        m.opaque(&cred.0);
    }
    m.u32(0); // verifier: AUTH_NONE
    m.u32(0);
    m.0.extend_from_slice(args);
    m.0
}

/// An XDR encoder: big-endian words, opaques padded to four bytes.
#[derive(Default)]
struct Xdr(Vec<u8>);

impl Xdr {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bool(&mut self, v: bool) {
        self.u32(u32::from(v));
    }
    fn opaque(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        let pad = (4 - v.len() % 4) % 4;
        self.0.extend_from_slice(&[0u8; 3][..pad]);
    }
    fn string(&mut self, v: &str) {
        self.opaque(v.as_bytes());
    }
    /// `nlm4_lock`.
    fn lock(&mut self, l: &NlmLock) {
        self.string(&l.caller_name);
        self.opaque(&l.fh);
        self.opaque(&l.oh);
        self.u32(l.svid as u32);
        self.u64(l.offset);
        self.u64(l.len);
    }
}

/// An XDR decoder; every read is None past the end.
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, at: 0 }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.data.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        Some((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }
    fn bool(&mut self) -> Option<bool> {
        Some(self.u32()? != 0)
    }
    fn opaque(&mut self) -> Option<Vec<u8>> {
        let len = self.u32()? as usize;
        let v = self.take(len)?.to_vec();
        self.take((4 - len % 4) % 4)?;
        Some(v)
    }
    fn rest(&self) -> &'a [u8] {
        &self.data[self.at.min(self.data.len())..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock() -> NlmLock {
        NlmLock {
            caller_name: "host".into(),
            fh: vec![1, 2, 3, 4, 5],
            oh: vec![9; 8],
            svid: -2,
            offset: 1 << 40,
            len: 0,
        }
    }

    #[test]
    fn a_lock_encodes_as_nlm4_lock_with_padding() {
        let mut x = Xdr::default();
        x.lock(&lock());
        let mut want = Vec::new();
        want.extend_from_slice(&[0, 0, 0, 4]);
        want.extend_from_slice(b"host");
        want.extend_from_slice(&[0, 0, 0, 5, 1, 2, 3, 4, 5, 0, 0, 0]);
        want.extend_from_slice(&[0, 0, 0, 8, 9, 9, 9, 9, 9, 9, 9, 9]);
        want.extend_from_slice(&[0xff, 0xff, 0xff, 0xfe]);
        want.extend_from_slice(&[0, 0, 1, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[0; 8]);
        assert_eq!(x.0, want);
    }

    #[test]
    fn the_call_header_carries_auth_unix() {
        let m = call_message(7, NLM_PROG, NLM_VERS, PROC_NM_LOCK, "ab", 5, 6, &[0xaa; 4]);
        let mut r = Reader::new(&m);
        let words: Vec<u32> = (0..6).map(|_| r.u32().unwrap()).collect();
        assert_eq!(words, [7, 0, 2, NLM_PROG, NLM_VERS, PROC_NM_LOCK]);
        assert_eq!(r.u32(), Some(1));
        let cred = r.opaque().unwrap();
        let mut c = Reader::new(&cred);
        assert_eq!(c.u32(), Some(0));
        assert_eq!(c.opaque().unwrap(), b"ab");
        assert_eq!(
            (c.u32(), c.u32(), c.u32(), c.u32()),
            (Some(5), Some(6), Some(1), Some(6))
        );
        assert_eq!((r.u32(), r.u32()), (Some(0), Some(0)));
        assert_eq!(r.rest(), &[0xaa; 4]);
    }

    #[test]
    fn replies_are_matched_by_xid_and_failures_become_words() {
        let mut ok = Xdr::default();
        for w in [9, 1, 0, 0, 0, 0, 42] {
            ok.u32(w);
        }
        assert_eq!(parse_reply(&ok.0, 9).unwrap(), Some(vec![0, 0, 0, 42]));
        assert_eq!(parse_reply(&ok.0, 8).unwrap(), None);
        let mut unavailable = Xdr::default();
        for w in [9, 1, 0, 0, 0, 1] {
            unavailable.u32(w);
        }
        assert!(parse_reply(&unavailable.0, 9)
            .unwrap_err()
            .contains("not served"));
        let mut denied = Xdr::default();
        for w in [9, 1, 1, 1, 5] {
            denied.u32(w);
        }
        assert!(parse_reply(&denied.0, 9)
            .unwrap_err()
            .contains("credentials"));
        assert!(parse_reply(&[0, 0, 0, 9, 0], 9).is_err());
    }

    #[test]
    fn truncated_opaques_are_refused_not_read_past_the_end() {
        let mut r = Reader::new(&[0, 0, 0, 8, 1, 2]);
        assert_eq!(r.opaque(), None);
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(r.opaque(), None);
    }
}
