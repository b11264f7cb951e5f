//! POSIX conformance of an nfs volume, measured against a local filesystem: every check runs once in a
//! local temporary directory (ext4 here) and once on a FUSE mount of a volume on a real NFS-Ganesha, and
//! records what it saw (a mode, an owner, an errno) under a key. The two records must agree except for the
//! keys in `KNOWN_DIFFERENCES`, each of which docs/nfs.md explains with its NFSv3 or server cause; a new
//! difference, or a known one that went away, fails the test. Needs root, /dev/fuse and ganesha.

use crate::nfs_support;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use nfs_support::{as_user, Host};
use nix::sys::stat::{makedev, mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

/// The keys whose outcome differs between an nfs volume and a local filesystem, and why. docs/nfs.md must
/// name each key.
const KNOWN_DIFFERENCES: &[(&str, &str)] = &[
    (
        "rename.noreplace_free_name",
        "NFSv3 RENAME always replaces; no atomic no-replace",
    ),
    ("rename.exchange", "NFSv3 has no atomic exchange"),
    (
        "times.before_1970",
        "NFSv3 times are unsigned 32-bit seconds",
    ),
    (
        "times.after_2106",
        "NFSv3 times are unsigned 32-bit seconds",
    ),
    (
        "unlink_open.fstat_nlink",
        "the file lives on under a hidden name",
    ),
    (
        "unlink_open.listing",
        "the hidden name is a real directory entry",
    ),
    (
        "unlink_open.rmdir_parent",
        "the hidden name keeps the directory non-empty",
    ),
    ("xattr.set", "NFSv3 has no extended attributes"),
];

/// What one run saw: key -> outcome.
type Outcomes = BTreeMap<String, String>;

/// An errno as its name, or "ok".
fn outcome<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => match e.raw_os_error() {
            Some(code) => format!("{:?}", nix::errno::Errno::from_raw(code)),
            None => format!("error {e}"),
        },
    }
}

fn nix_outcome(r: nix::Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => format!("{e:?}"),
    }
}

/// The kind, permission bits and device number of `path` (not following a symlink).
fn describe(path: &Path) -> String {
    match fs::symlink_metadata(path) {
        Err(e) => outcome::<()>(Err(e)),
        Ok(m) => {
            let t = m.file_type();
            let kind = if t.is_file() {
                "file"
            } else if t.is_dir() {
                "dir"
            } else if t.is_symlink() {
                "symlink"
            } else if t.is_fifo() {
                "fifo"
            } else if t.is_socket() {
                "socket"
            } else if t.is_char_device() {
                "char"
            } else if t.is_block_device() {
                "block"
            } else {
                "unknown"
            };
            let dev = if t.is_char_device() || t.is_block_device() {
                format!(
                    " {}:{}",
                    nix::sys::stat::major(m.rdev()),
                    nix::sys::stat::minor(m.rdev())
                )
            } else {
                String::new()
            };
            format!("{kind} {:o}{dev}", m.mode() & 0o7777)
        }
    }
}

fn owner(path: &Path) -> String {
    match fs::symlink_metadata(path) {
        Ok(m) => format!("{}:{}", m.uid(), m.gid()),
        Err(e) => outcome::<()>(Err(e)),
    }
}

fn perms(path: &Path) -> String {
    match fs::symlink_metadata(path) {
        Ok(m) => format!("{:o}", m.mode() & 0o7777),
        Err(e) => outcome::<()>(Err(e)),
    }
}

/// Names in `dir`, sorted, with hidden names of unlinked open files shown by their prefix only.
fn listing(dir: &Path) -> String {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            if name.starts_with(".ferry-unlinked-") {
                ".ferry-unlinked-*".into()
            } else {
                name
            }
        })
        .collect();
    names.sort();
    format!("{names:?}")
}

fn mtime(path: &Path) -> (i64, i64) {
    let m = fs::symlink_metadata(path).unwrap();
    (m.mtime(), m.mtime_nsec())
}

/// Every check, in `root` (an empty directory, mode 0777).
fn run_checks(root: &Path) -> Outcomes {
    let mut out = Outcomes::new();
    let p = |name: &str| root.join(name);
    let mut note = |key: &str, value: String| {
        out.insert(key.to_string(), value);
    };

    // ---- file types ----
    fs::write(p("regular"), b"data").unwrap();
    fs::set_permissions(p("regular"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::create_dir(p("directory")).unwrap();
    std::os::unix::fs::symlink("regular", p("symlink")).unwrap();
    let fifo = nix::unistd::mkfifo(&p("fifo"), Mode::from_bits_truncate(0o640));
    let chr = mknod(
        &p("chardev"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o640),
        makedev(1, 3),
    );
    let blk = mknod(
        &p("blockdev"),
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o640),
        makedev(7, 200),
    );
    let sock = std::os::unix::net::UnixListener::bind(p("socket"));
    note("types.mkfifo", nix_outcome(fifo));
    note("types.mknod_char", nix_outcome(chr));
    note("types.mknod_block", nix_outcome(blk));
    let bound = match &sock {
        Ok(_) => "ok".to_string(),
        Err(e) => outcome::<()>(Err(std::io::Error::from_raw_os_error(
            e.raw_os_error().unwrap_or_default(),
        ))),
    };
    note("types.bind_socket", bound);
    for name in [
        "regular",
        "directory",
        "symlink",
        "fifo",
        "chardev",
        "blockdev",
        "socket",
    ] {
        note(&format!("types.stat_{name}"), describe(&p(name)));
    }
    let mut kinds: Vec<String> = fs::read_dir(root)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            format!(
                "{}={}",
                e.file_name().to_string_lossy(),
                if t.is_file() {
                    "f"
                } else if t.is_dir() {
                    "d"
                } else if t.is_symlink() {
                    "l"
                } else if t.is_fifo() {
                    "p"
                } else if t.is_socket() {
                    "s"
                } else if t.is_char_device() {
                    "c"
                } else {
                    "b"
                }
            )
        })
        .collect();
    kinds.sort();
    note("types.readdir", kinds.join(" "));
    drop(sock);

    // ---- ownership ----
    fs::create_dir(p("own")).unwrap();
    fs::set_permissions(p("own"), fs::Permissions::from_mode(0o777)).unwrap();
    as_user(1500, 2000, || {
        fs::write(p("own/file"), b"x").unwrap();
        fs::create_dir(p("own/dir")).unwrap();
        std::os::unix::fs::symlink("file", p("own/link")).unwrap();
    });
    note("owner.new_file", owner(&p("own/file")));
    note("owner.new_dir", owner(&p("own/dir")));
    note("owner.new_symlink", owner(&p("own/link")));
    fs::write(p("own/by-root"), b"x").unwrap();
    note(
        "owner.chown_by_root",
        outcome(std::os::unix::fs::chown(
            p("own/by-root"),
            Some(3000),
            Some(3001),
        )) + " "
            + &owner(&p("own/by-root")),
    );
    note(
        "owner.chown_by_non_owner",
        as_user(1500, 2000, || {
            outcome(std::os::unix::fs::chown(p("own/by-root"), Some(1500), None))
        }),
    );
    note(
        "owner.chgrp_to_a_foreign_group",
        as_user(1500, 2000, || {
            outcome(std::os::unix::fs::chown(p("own/file"), None, Some(4000)))
        }),
    );
    fs::write(p("own/suid"), b"x").unwrap();
    fs::set_permissions(p("own/suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::chown(p("own/suid"), Some(1500), None).unwrap();
    note("owner.chown_clears_setuid", perms(&p("own/suid")));

    // ---- setgid directories ----
    fs::create_dir(p("team")).unwrap();
    std::os::unix::fs::chown(p("team"), None, Some(1000)).unwrap();
    fs::set_permissions(p("team"), fs::Permissions::from_mode(0o2777)).unwrap();
    as_user(1500, 2000, || {
        fs::write(p("team/file"), b"x").unwrap();
        fs::create_dir(p("team/sub")).unwrap();
        let _ = nix::unistd::mkfifo(&p("team/fifo"), Mode::from_bits_truncate(0o644));
        std::os::unix::fs::symlink("file", p("team/link")).unwrap();
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o2775)
            .open(p("team/sgid-asked"))
            .unwrap();
    });
    note(
        "setgid.file",
        owner(&p("team/file")) + " " + &perms(&p("team/file")),
    );
    note(
        "setgid.dir",
        owner(&p("team/sub")) + " " + &perms(&p("team/sub")),
    );
    note("setgid.fifo", owner(&p("team/fifo")));
    note("setgid.symlink", owner(&p("team/link")));
    note(
        "setgid.file_asking_for_the_bit_as_a_non_member",
        perms(&p("team/sgid-asked")),
    );
    fs::create_dir(p("team/sub/deeper")).unwrap();
    note(
        "setgid.nested_dir_by_root",
        owner(&p("team/sub/deeper")) + " " + &perms(&p("team/sub/deeper")),
    );

    // ---- modes ----
    fs::create_dir(p("modes")).unwrap();
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(p("modes/created"));
    note(
        "mode.create_0640",
        outcome(f) + " " + &perms(&p("modes/created")),
    );
    for (name, mode) in [("suid", 0o4755), ("sgid", 0o2755), ("sticky", 0o1777)] {
        fs::write(p(&format!("modes/{name}")), b"x").unwrap();
        let r = fs::set_permissions(
            p(&format!("modes/{name}")),
            fs::Permissions::from_mode(mode),
        );
        note(
            &format!("mode.chmod_{name}"),
            outcome(r) + " " + &perms(&p(&format!("modes/{name}"))),
        );
    }
    fs::create_dir(p("modes/stickydir")).unwrap();
    fs::set_permissions(p("modes/stickydir"), fs::Permissions::from_mode(0o1777)).unwrap();
    note("mode.sticky_dir", perms(&p("modes/stickydir")));
    fs::write(p("modes/stickydir/roots"), b"x").unwrap();
    note(
        "mode.sticky_dir_unlink_by_other",
        as_user(1500, 2000, || {
            outcome(fs::remove_file(p("modes/stickydir/roots")))
        }),
    );
    fs::write(p("modes/rootfile"), b"x").unwrap();
    fs::set_permissions(p("modes/rootfile"), fs::Permissions::from_mode(0o644)).unwrap();
    note(
        "mode.chmod_by_non_owner",
        as_user(1500, 2000, || {
            outcome(fs::set_permissions(
                p("modes/rootfile"),
                fs::Permissions::from_mode(0o777),
            ))
        }),
    );
    note(
        "mode.write_without_permission",
        as_user(1500, 2000, || {
            outcome(OpenOptions::new().write(true).open(p("modes/rootfile")))
        }),
    );
    note(
        "mode.read_with_permission",
        as_user(1500, 2000, || outcome(fs::read(p("modes/rootfile")))),
    );
    fs::create_dir(p("modes/closed")).unwrap();
    fs::set_permissions(p("modes/closed"), fs::Permissions::from_mode(0o700)).unwrap();
    note(
        "mode.create_in_a_closed_dir",
        as_user(1500, 2000, || outcome(fs::write(p("modes/closed/x"), b"x"))),
    );

    // ---- links ----
    fs::create_dir(p("links")).unwrap();
    fs::write(p("links/a"), b"linked").unwrap();
    note(
        "links.hard",
        outcome(fs::hard_link(p("links/a"), p("links/b"))),
    );
    let (ma, mb) = (
        fs::metadata(p("links/a")).unwrap(),
        fs::metadata(p("links/b")).unwrap(),
    );
    note(
        "links.hard_nlink_and_inode",
        format!(
            "{} {} same={}",
            ma.nlink(),
            mb.nlink(),
            ma.ino() == mb.ino()
        ),
    );
    fs::write(p("links/b"), b"through b").unwrap();
    note(
        "links.data_shared",
        String::from_utf8_lossy(&fs::read(p("links/a")).unwrap()).into_owned(),
    );
    fs::remove_file(p("links/a")).unwrap();
    note(
        "links.nlink_after_unlink",
        fs::metadata(p("links/b")).unwrap().nlink().to_string(),
    );
    note(
        "links.hard_link_to_a_dir",
        outcome(fs::hard_link(p("directory"), p("links/dirlink"))),
    );
    note(
        "links.hard_link_over_existing",
        outcome(fs::hard_link(p("links/b"), p("regular"))),
    );
    std::os::unix::fs::symlink("../regular", p("links/sym")).unwrap();
    note(
        "links.readlink",
        fs::read_link(p("links/sym")).unwrap().display().to_string(),
    );
    note("links.symlink_mode", perms(&p("links/sym")));
    note(
        "links.follow",
        outcome(fs::read(p("links/sym"))) + " " + &fs::read_to_string(p("links/sym")).unwrap(),
    );
    note(
        "links.hard_link_to_a_symlink",
        nix_outcome(nix::unistd::linkat(
            None,
            &p("links/sym"),
            None,
            &p("links/sym2"),
            // Without AT_SYMLINK_FOLLOW: links the symlink itself.
            nix::fcntl::AtFlags::empty(),
        )) + " "
            + &describe(&p("links/sym2")),
    );
    let long_target = "t".repeat(1000);
    std::os::unix::fs::symlink(&long_target, p("links/long")).unwrap();
    note(
        "links.long_target",
        (fs::read_link(p("links/long")).unwrap().as_os_str().len()).to_string(),
    );

    // ---- renames ----
    fs::create_dir(p("ren")).unwrap();
    let w = |name: &str, data: &str| fs::write(p(&format!("ren/{name}")), data).unwrap();
    let r = |from: &str, to: &str| {
        outcome(fs::rename(
            p(&format!("ren/{from}")),
            p(&format!("ren/{to}")),
        ))
    };
    w("f1", "one");
    w("f2", "two");
    note(
        "rename.file_over_file",
        r("f1", "f2") + " " + &fs::read_to_string(p("ren/f2")).unwrap(),
    );
    fs::create_dir(p("ren/d1")).unwrap();
    fs::create_dir(p("ren/d2")).unwrap();
    note("rename.dir_over_empty_dir", r("d1", "d2"));
    fs::create_dir(p("ren/d3")).unwrap();
    w("d2/inside", "x");
    note("rename.dir_over_non_empty_dir", r("d3", "d2"));
    note("rename.file_over_dir", r("f2", "d3"));
    note("rename.dir_over_file", r("d3", "f2"));
    note("rename.dir_into_itself", r("d2", "d2/below"));
    note("rename.missing_source", r("nothing", "f9"));
    w("h1", "hard");
    fs::hard_link(p("ren/h1"), p("ren/h2")).unwrap();
    note(
        "rename.onto_a_hard_link_of_itself",
        r("h1", "h2") + " " + &listing(&p("ren")),
    );
    w("open-target", "old");
    w("new-source", "new");
    let mut held = fs::File::open(p("ren/open-target")).unwrap();
    note("rename.over_an_open_file", r("new-source", "open-target"));
    let mut old = String::new();
    held.read_to_string(&mut old).unwrap();
    note("rename.open_file_keeps_its_data", old);
    drop(held);
    let flags_rename = |from: &str, to: &str, flags: nix::fcntl::RenameFlags| {
        nix_outcome(nix::fcntl::renameat2(
            None,
            &p(&format!("ren/{from}")),
            None,
            &p(&format!("ren/{to}")),
            flags,
        ))
    };
    w("x1", "x1");
    w("x2", "x2");
    note(
        "rename.noreplace",
        flags_rename("x1", "x2", nix::fcntl::RenameFlags::RENAME_NOREPLACE),
    );
    note(
        "rename.noreplace_free_name",
        flags_rename("x1", "x3", nix::fcntl::RenameFlags::RENAME_NOREPLACE),
    );
    note(
        "rename.exchange",
        flags_rename("x2", "f2", nix::fcntl::RenameFlags::RENAME_EXCHANGE),
    );

    // ---- unlink of open files ----
    fs::create_dir(p("gone")).unwrap();
    fs::write(p("gone/f"), b"still here").unwrap();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(p("gone/f"))
        .unwrap();
    fs::remove_file(p("gone/f")).unwrap();
    note(
        "unlink_open.name_gone",
        outcome(fs::symlink_metadata(p("gone/f"))),
    );
    let mut data = String::new();
    f.read_to_string(&mut data).unwrap();
    note("unlink_open.read", data);
    f.write_all(b" and more").unwrap();
    f.rewind().unwrap();
    let mut data = String::new();
    f.read_to_string(&mut data).unwrap();
    note("unlink_open.write_then_read", data);
    note(
        "unlink_open.fstat_nlink",
        f.metadata().unwrap().nlink().to_string(),
    );
    note("unlink_open.listing", listing(&p("gone")));
    note(
        "unlink_open.rmdir_parent",
        outcome(fs::remove_dir(p("gone"))),
    );
    // Locally the directory went: bring it back so both runs go on alike.
    let _ = fs::create_dir(p("gone"));
    note(
        "unlink_open.recreate_name",
        outcome(fs::write(p("gone/f"), b"new")),
    );
    let _ = fs::remove_file(p("gone/f"));
    drop(f);
    // The kernel tells a FUSE filesystem of the last close just after close(2) returns: give it a moment.
    let mut after_close = listing(&p("gone"));
    for _ in 0..100 {
        if after_close == "[]" {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        after_close = listing(&p("gone"));
    }
    note("unlink_open.listing_after_close", after_close);

    // ---- times ----
    fs::create_dir(p("times")).unwrap();
    let t = |name: &str| p(&format!("times/{name}"));
    let set = |name: &str, a: (i64, i64), m: (i64, i64)| {
        fs::write(t(name), b"x").unwrap();
        let r = utimensat(
            None,
            &t(name),
            &TimeSpec::new(a.0, a.1),
            &TimeSpec::new(m.0, m.1),
            UtimensatFlags::FollowSymlink,
        );
        format!("{} {:?}", nix_outcome(r), mtime(&t(name)))
    };
    note(
        "times.exact",
        set("exact", (1_600_000_000, 123), (1_500_000_000, 987_654_321)),
    );
    let meta = fs::metadata(t("exact")).unwrap();
    note(
        "times.exact_atime",
        format!("{} {}", meta.atime(), meta.atime_nsec()),
    );
    note("times.before_1970", set("early", (0, 0), (-100, 0)));
    note(
        "times.after_2106",
        set("late", (0, 0), ((1i64 << 32) + 100, 0)),
    );
    note("times.year_2100", set("y2100", (0, 0), (4_102_444_800, 0)));
    fs::write(t("moves"), b"x").unwrap();
    utimensat(
        None,
        &t("moves"),
        &TimeSpec::new(1_000_000_000, 0),
        &TimeSpec::new(1_000_000_000, 0),
        UtimensatFlags::FollowSymlink,
    )
    .unwrap();
    let before = fs::metadata(t("moves")).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    OpenOptions::new()
        .append(true)
        .open(t("moves"))
        .unwrap()
        .write_all(b"more")
        .unwrap();
    let after = fs::metadata(t("moves")).unwrap();
    note(
        "times.write_moves_mtime_and_ctime",
        format!(
            "{} {}",
            after.mtime() > before.mtime(),
            (after.ctime(), after.ctime_nsec()) > (before.ctime(), before.ctime_nsec())
        ),
    );
    std::thread::sleep(Duration::from_millis(20));
    fs::set_permissions(t("moves"), fs::Permissions::from_mode(0o600)).unwrap();
    let chmodded = fs::metadata(t("moves")).unwrap();
    note(
        "times.chmod_moves_ctime_only",
        format!(
            "{} {}",
            (chmodded.ctime(), chmodded.ctime_nsec()) > (after.ctime(), after.ctime_nsec()),
            chmodded.mtime() == after.mtime()
        ),
    );
    let r = utimensat(
        None,
        &t("moves"),
        &TimeSpec::UTIME_NOW,
        &TimeSpec::UTIME_NOW,
        UtimensatFlags::FollowSymlink,
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    note(
        "times.now",
        format!(
            "{} {}",
            nix_outcome(r),
            (now - mtime(&t("moves")).0).abs() < 5
        ),
    );
    let mtime_only = utimensat(
        None,
        &t("exact"),
        &TimeSpec::UTIME_OMIT,
        &TimeSpec::new(1_400_000_000, 0),
        UtimensatFlags::FollowSymlink,
    );
    note(
        "times.omit_keeps_atime",
        format!(
            "{} {}",
            nix_outcome(mtime_only),
            fs::metadata(t("exact")).unwrap().atime()
        ),
    );

    // ---- O_EXCL ----
    fs::create_dir(p("excl")).unwrap();
    let create_new = |name: &str| {
        outcome(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(p(&format!("excl/{name}"))),
        )
    };
    note("excl.new", create_new("one"));
    note("excl.existing", create_new("one"));
    std::os::unix::fs::symlink("nowhere", p("excl/dangling")).unwrap();
    note("excl.dangling_symlink", create_new("dangling"));
    note(
        "excl.dangling_symlink_target_not_made",
        outcome(fs::symlink_metadata(p("excl/nowhere"))),
    );
    let winners = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| create_new("race") == "ok"))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|won| *won)
            .count()
    });
    note("excl.race_of_8", format!("{winners} winner(s)"));
    note(
        "excl.o_creat_without_excl_on_existing",
        outcome(
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(p("excl/one")),
        ),
    );

    // ---- extended attributes ----
    let path = std::ffi::CString::new(p("regular").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            c"user.ferry".as_ptr(),
            b"v".as_ptr().cast(),
            1,
            0,
        )
    };
    note(
        "xattr.set",
        if rc == 0 {
            "ok".into()
        } else {
            outcome::<()>(Err(std::io::Error::last_os_error()))
        },
    );

    out
}

#[test]
fn an_nfs_volume_behaves_like_a_local_filesystem_except_for_the_documented_differences() {
    let server = nfs_support::server();
    let host = Host::mount(
        &server,
        "posix",
        Duration::from_secs(10),
        Duration::from_secs(1),
    );
    let local = tempfile::Builder::new()
        .prefix("ferry-posix-local")
        .tempdir()
        .unwrap();
    fs::set_permissions(local.path(), fs::Permissions::from_mode(0o777)).unwrap();

    let want = run_checks(local.path());
    let got = run_checks(host.dir.path());

    let mut report = String::new();
    let mut differ = Vec::new();
    for (key, local_saw) in &want {
        let nfs_saw = got.get(key).cloned().unwrap_or_default();
        if &nfs_saw != local_saw {
            report.push_str(&format!("  {key}: local {local_saw:?}, nfs {nfs_saw:?}\n"));
            differ.push(key.as_str());
        }
    }
    println!("{} checks, {} differ:\n{report}", want.len(), differ.len());
    let mut known: Vec<&str> = KNOWN_DIFFERENCES.iter().map(|(k, _)| *k).collect();
    known.sort();
    assert_eq!(
        differ, known,
        "the differences from a local filesystem changed; update KNOWN_DIFFERENCES and docs/nfs.md:\n{report}"
    );

    // Every known difference is explained to users.
    let docs = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/nfs.md"))
        .expect("docs/nfs.md");
    for key in known {
        assert!(
            docs.contains(&format!("`{key}`")),
            "docs/nfs.md does not explain `{key}`"
        );
    }
}
