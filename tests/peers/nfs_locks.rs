//! Cross-host advisory locks on nfs volumes: two daemons standing in for two hosts mount one volume of a
//! real NFS-Ganesha with its lock manager (NLM 4) through FUSE, and `fcntl` locks taken on one refuse the
//! other, wait for it, go with a close or a killed helper, as `flock` locks do; two SQLite writers lose
//! nothing. Without a lock manager, locks fail with ENOLCK, or stay on one host with `locks = "local"`.
//! Needs root, /dev/fuse and ganesha.

use crate::common;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::ganesha::Ganesha;
use common::Daemon;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};

/// One daemon ("host") with the volume `v` mounted.
struct Host {
    d: Daemon,
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Host {
    /// A daemon configured for `g` (plus `extra` lines in `[nfs]`), with `v` created and mounted.
    fn start(g: &Ganesha, name: &str, extra: &str) -> Host {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ferry-locks-{name}"))
            .tempdir()
            .unwrap();
        let config = dir.path().join("ferry.toml");
        std::fs::write(&config, format!("{}{extra}", g.config_section("10s"))).unwrap();
        let d = Daemon::start_in(
            dir.path(),
            &dir.path().join("ferry.sock"),
            &[("FERRY_CONFIG", config.to_str().unwrap())],
        );
        d.create("v", r#"{"backend":"nfs"}"#);
        let mnt = d.mount("v", "c1");
        assert!(common::is_mounted(&mnt), "{} is not mounted", mnt.display());
        Host { d, _dir: dir, mnt }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    fn open(&self, name: &str) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.path(name))
            .unwrap()
    }

    fn helper_pid(&self) -> i32 {
        std::fs::read_to_string(self.d.state.join("nfs/v/helper.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn helper_log(&self) -> String {
        std::fs::read_to_string(self.d.state.join("nfs/v/helper.log")).unwrap_or_default()
    }
}

fn ganesha() -> Ganesha {
    assert!(
        Path::new("/dev/fuse").exists() && nix::unistd::geteuid().is_root(),
        "these tests mount FUSE filesystems: they need /dev/fuse and root"
    );
    Ganesha::start()
}

fn lock_struct(kind: libc::c_int, start: i64, len: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: len,
        l_pid: 0,
    }
}

/// F_SETLK (or F_SETLKW with `wait`) of `kind` on `start..start+len` (len 0: to the end).
fn setlk(f: &File, kind: libc::c_int, start: i64, len: i64, wait: bool) -> Result<(), Errno> {
    let fl = lock_struct(kind, start, len);
    let arg = if wait {
        FcntlArg::F_SETLKW(&fl)
    } else {
        FcntlArg::F_SETLK(&fl)
    };
    fcntl(f.as_raw_fd(), arg).map(|_| ())
}

/// F_GETLK: the lock in the way of a write lock on the whole file, as (type, pid).
fn getlk(f: &File) -> (libc::c_int, i32) {
    let mut fl = lock_struct(libc::F_WRLCK, 0, 0);
    fcntl(f.as_raw_fd(), FcntlArg::F_GETLK(&mut fl)).unwrap();
    (libc::c_int::from(fl.l_type), fl.l_pid)
}

/// flock(2) with `op` (LOCK_SH, LOCK_EX, LOCK_UN, with LOCK_NB).
fn flock(f: &File, op: libc::c_int) -> Result<(), Errno> {
    // SAFETY: flock(2) on a descriptor `f` owns; it touches no memory.
    Errno::result(unsafe { libc::flock(f.as_raw_fd(), op) }).map(drop)
}

/// A non-blocking flock that may have to wait for a close just made elsewhere: the kernel releases a flock
/// with its file's RELEASE, which it sends after close(2) has returned.
fn flock_after_close(f: &File, op: libc::c_int) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match flock(f, op | libc::LOCK_NB) {
            Ok(()) => return,
            Err(Errno::EWOULDBLOCK) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("flock still refused 5 s after the holder closed the file: {e}"),
        }
    }
}

/// Takes a blocking write lock on the whole file in a thread; the receiver gets its result.
fn lock_in_thread(f: File) -> mpsc::Receiver<(Result<(), Errno>, File)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = setlk(&f, libc::F_WRLCK, 0, 0, true);
        let _ = tx.send((r, f));
    });
    rx
}

#[test]
fn a_lock_on_one_host_refuses_the_other_and_a_blocked_lock_waits_for_the_close() {
    let g = ganesha();
    let a = Host::start(&g, "a", "");
    let b = Host::start(&g, "b", "");
    let fa = a.open("db");
    let fb = b.open("db");

    setlk(&fa, libc::F_WRLCK, 0, 100, false).unwrap();
    assert_eq!(
        setlk(&fb, libc::F_WRLCK, 50, 1, false),
        Err(Errno::EAGAIN),
        "host b got a lock host a holds; helper log of b:\n{}",
        b.helper_log()
    );
    assert_eq!(setlk(&fb, libc::F_RDLCK, 0, 1, false), Err(Errno::EAGAIN));
    // F_GETLK names the holder; the bytes past it are free.
    let (kind, pid) = getlk(&fb);
    assert_eq!(kind, libc::F_WRLCK);
    assert_eq!(pid, std::process::id() as i32);
    setlk(&fb, libc::F_WRLCK, 100, 10, false).unwrap();
    setlk(&fb, libc::F_UNLCK, 100, 10, false).unwrap();

    // A blocking lock on b waits while a holds the lock, and gets it once a closes the file.
    let waiter = lock_in_thread(b.open("db"));
    assert!(
        waiter.recv_timeout(Duration::from_millis(700)).is_err(),
        "host b's F_SETLKW returned while host a held the lock"
    );
    let closed = Instant::now();
    drop(fa);
    let (r, fb2) = waiter
        .recv_timeout(Duration::from_secs(10))
        .expect("host b's F_SETLKW still waits 10 s after host a closed the file");
    r.unwrap();
    eprintln!(
        "the blocked lock was granted {:?} after the close",
        closed.elapsed()
    );
    // Now a is refused, and an unlock on b frees it.
    let fa = a.open("db");
    assert_eq!(setlk(&fa, libc::F_WRLCK, 0, 0, false), Err(Errno::EAGAIN));
    setlk(&fb2, libc::F_UNLCK, 0, 0, false).unwrap();
    setlk(&fa, libc::F_WRLCK, 0, 0, false).unwrap();
    drop((fa, fb, fb2));
}

#[test]
fn a_flock_on_one_host_refuses_the_other_and_goes_with_the_last_close() {
    let g = ganesha();
    let a = Host::start(&g, "a", "");
    let b = Host::start(&g, "b", "");

    // Shared locks on both hosts go together; an exclusive one waits for both to let go.
    let sa = a.open("f");
    let sb = b.open("f");
    flock(&sa, libc::LOCK_SH | libc::LOCK_NB).unwrap();
    flock(&sb, libc::LOCK_SH | libc::LOCK_NB).unwrap();
    let xa = a.open("f");
    assert_eq!(
        flock(&xa, libc::LOCK_EX | libc::LOCK_NB),
        Err(Errno::EWOULDBLOCK),
        "host a got an exclusive flock while host b held a shared one; helper log of a:\n{}",
        a.helper_log()
    );
    flock(&sb, libc::LOCK_UN).unwrap();
    drop(sa);
    flock_after_close(&xa, libc::LOCK_EX);

    // Host b is refused both kinds while a holds it, and a blocking flock waits for a's close.
    let fb = b.open("f");
    assert_eq!(
        flock(&fb, libc::LOCK_EX | libc::LOCK_NB),
        Err(Errno::EWOULDBLOCK),
        "host b got a flock host a holds; helper log of b:\n{}",
        b.helper_log()
    );
    assert_eq!(
        flock(&fb, libc::LOCK_SH | libc::LOCK_NB),
        Err(Errno::EWOULDBLOCK)
    );
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = flock(&fb, libc::LOCK_EX);
        let _ = tx.send((r, fb));
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(700)).is_err(),
        "host b's blocking flock returned while host a held the lock"
    );
    // The last close of the open file releases a flock (no unlock).
    drop(xa);
    let (r, fb) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("host b's blocking flock still waits 10 s after host a closed the file");
    r.unwrap();
    let fa = a.open("f");
    assert_eq!(
        flock(&fa, libc::LOCK_SH | libc::LOCK_NB),
        Err(Errno::EWOULDBLOCK)
    );
    drop(fb);
    flock_after_close(&fa, libc::LOCK_EX);
}

#[test]
fn locks_of_a_killed_helper_are_released() {
    let g = ganesha();
    let a = Host::start(&g, "a", "");
    let b = Host::start(&g, "b", "");
    let fa = a.open("f");
    setlk(&fa, libc::F_WRLCK, 0, 0, false).unwrap();
    let fb = b.open("f");
    assert_eq!(setlk(&fb, libc::F_WRLCK, 0, 0, false), Err(Errno::EAGAIN));
    let waiter = lock_in_thread(fb);

    // Host a's helper dies holding the lock (its file is still open): its daemon releases the lock.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.helper_pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (r, fb) = waiter
        .recv_timeout(Duration::from_secs(15))
        .expect("host b still waits 15 s after host a's helper was killed");
    r.unwrap();
    drop((fa, fb));
    // Logged once the unlock is answered, which may be just after host b's lock attempt got it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut log = a.d.log_text();
    while !log.contains("released the locks of a FUSE helper that died") {
        assert!(Instant::now() < deadline, "{log}");
        std::thread::sleep(Duration::from_millis(50));
        log = a.d.log_text();
    }
}

/// Runs `n` single-row transactions from one sqlite3 process against `db`; returns how many it reported
/// committed (each commit is followed by a SELECT that prints a line; `-bail` stops at the first failure).
fn sqlite_writer(db: &Path, host: &str, n: usize) -> std::thread::JoinHandle<(usize, String)> {
    let db = db.to_path_buf();
    let host = host.to_string();
    std::thread::spawn(move || {
        let mut script = String::from(".timeout 60000\n");
        for i in 0..n {
            script.push_str(&format!(
                "BEGIN IMMEDIATE;\nINSERT INTO t(host, seq, pad) VALUES('{host}', {i}, randomblob(300));\n\
                 COMMIT;\nSELECT 'committed {i}';\n"
            ));
        }
        let mut child = Command::new("sqlite3")
            .arg("-bail")
            .arg(&db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let committed = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("committed "))
            .count();
        (committed, String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

#[test]
fn two_sqlite_writers_on_two_hosts_lose_nothing() {
    if Command::new("sqlite3").arg("-version").output().is_err() {
        panic!("sqlite3 is not installed: run scripts/deps as root");
    }
    let g = ganesha();
    // The default attribute cache: SQLite deletes and recreates its journal on every transaction, so a
    // host often opens the journal through a name it cached while the other host replaced the file;
    // open's revalidation answers ESTALE and the kernel looks the name up again.
    let a = Host::start(&g, "a", "");
    let b = Host::start(&g, "b", "");
    let out = Command::new("sqlite3")
        .arg(a.path("test.db"))
        .arg("CREATE TABLE t(id INTEGER PRIMARY KEY, host TEXT, seq INTEGER, pad BLOB);")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    const N: usize = 150;
    let wa = sqlite_writer(&a.path("test.db"), "a", N);
    let wb = sqlite_writer(&b.path("test.db"), "b", N);
    let (ca, ea) = wa.join().unwrap();
    let (cb, eb) = wb.join().unwrap();
    assert_eq!(
        (ca, cb),
        (N, N),
        "not every transaction committed: a: {ea} b: {eb}\nhelper a:\n{}\nhelper b:\n{}",
        a.helper_log(),
        b.helper_log()
    );

    // Counted on each host and on the server's disk: every reported commit is there, once.
    for (db, who) in [
        (a.path("test.db"), "host a"),
        (b.path("test.db"), "host b"),
        (g.export().join("v/test.db"), "the server's disk"),
    ] {
        let out = Command::new("sqlite3")
            .arg(&db)
            .arg("PRAGMA integrity_check; SELECT host, count(*), count(DISTINCT seq) FROM t GROUP BY host;")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.trim(),
            format!("ok\na|{N}|{N}\nb|{N}|{N}"),
            "rows as seen from {who}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn without_a_lock_manager_locks_fail_with_enolck_unless_local_is_chosen() {
    assert!(Path::new("/dev/fuse").exists() && nix::unistd::geteuid().is_root());
    let g = Ganesha::start_without_nlm();
    let a = Host::start(&g, "a", "");
    let f = a.open("f");
    assert_eq!(setlk(&f, libc::F_WRLCK, 0, 0, false), Err(Errno::ENOLCK));
    assert_eq!(setlk(&f, libc::F_RDLCK, 0, 0, true), Err(Errno::ENOLCK));
    assert_eq!(flock(&f, libc::LOCK_EX | libc::LOCK_NB), Err(Errno::ENOLCK));
    let log = a.helper_log();
    assert!(log.contains("no lock manager"), "{log}");
    // Reading and writing are not affected.
    std::fs::write(a.path("g"), b"data").unwrap();
    drop(f);

    // With locks = "local", locks work between this host's users (here, two open files of the mount)...
    let l = Host::start(&g, "local", "locks = \"local\"\n");
    let f1 = l.open("f");
    setlk(&f1, libc::F_WRLCK, 0, 0, false).unwrap();
    // ...seen from another process (POSIX locks of one process never conflict with each other).
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import fcntl, sys\nf = open(sys.argv[1], 'r+')\ntry:\n    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n    print('granted')\nexcept OSError as e:\n    print('refused', e.errno)\n",
        )
        .arg(l.path("f"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("refused {}", libc::EAGAIN),
        "{out:?}"
    );
    drop(f1);
    // flock locks belong to the open file: a second open of it is refused even in this process.
    let f2 = l.open("f");
    flock(&f2, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    assert_eq!(
        flock(&l.open("f"), libc::LOCK_SH | libc::LOCK_NB),
        Err(Errno::EWOULDBLOCK)
    );
    drop(f2);
    let out = Command::new("python3")
        .arg("-c")
        .arg("import fcntl, sys\nf = open(sys.argv[1], 'r+')\nfcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nprint('granted')\n")
        .arg(l.path("f"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "granted",
        "{out:?}"
    );
}

#[test]
fn a_signal_interrupts_a_blocked_lock() {
    let g = ganesha();
    let a = Host::start(&g, "a", "");
    let b = Host::start(&g, "b", "");
    let fa = a.open("f");
    setlk(&fa, libc::F_WRLCK, 0, 0, false).unwrap();
    // Another process on host b waits for the lock; SIGALRM after 1 s interrupts the wait (Python's handler
    // is installed without SA_RESTART, and raising in it ends the call).
    let mut waiter = Command::new("python3")
        .arg("-c")
        .arg(
            "import fcntl, signal, sys\n\
             def alarm(*_):\n    raise TimeoutError\n\
             signal.signal(signal.SIGALRM, alarm)\n\
             f = open(sys.argv[1], 'r+')\n\
             signal.alarm(1)\n\
             try:\n    fcntl.lockf(f, fcntl.LOCK_EX)\n    print('granted')\n\
             except TimeoutError:\n    print('interrupted')\n",
        )
        .arg(b.path("f"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while waiter.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = waiter.kill();
            panic!("the blocked lock was not interrupted within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = waiter.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "interrupted");
    // The interrupted request left nothing behind: once a lets go, b locks at once.
    drop(fa);
    let fb = b.open("f");
    setlk(&fb, libc::F_WRLCK, 0, 0, false).unwrap();
}
