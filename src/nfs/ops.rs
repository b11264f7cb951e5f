//! `HandleOps`: the NFSv3 procedures on file handles, for a data path (a FUSE filesystem) rather than
//! for control operations by path.
//!
//! Each method is one procedure (plus, where the server may omit a handle or attributes from its reply,
//! the LOOKUP or GETATTR that fetches them), through the client's one call path (`NfsClient::call`):
//! under its deadline, on its connection pool (as many calls run at once as the pool has connections),
//! and a server that answers JUKEBOX ("busy, try later") is asked again until the deadline. Nothing is cached here except FSINFO; in particular
//! no data and no attributes, so callers always see the server's current state.
//!
//! Calls are not retried after a lost reply, with one exception inherited from the pool: a call that
//! fails on an idle connection the server had closed is sent once more on a new connection. The server
//! normally never saw the first attempt; if it did, a repeated REMOVE, RMDIR, RENAME, LINK, MKDIR or
//! SYMLINK reports NOENT or EXIST although it worked, as with any NFSv3 client without a reply cache.

use std::future::Future;

use bytes::Bytes;
use nfs3_client::nfs3_types::nfs3::{
    cookieverf3, createhow3, createverf3, devicedata3, diropargs3, fattr3, filename3, mknoddata3,
    nfspath3, specdata3, symlinkdata3, COMMIT3args, CREATE3args, FSINFO3args, FSSTAT3args,
    GETATTR3args, LINK3args, LOOKUP3args, MKDIR3args, MKNOD3args, Nfs3Option, Nfs3Result,
    READ3args, READDIRPLUS3args, READLINK3args, REMOVE3args, RENAME3args, RMDIR3args, SETATTR3args,
    SYMLINK3args, WRITE3args,
};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::RpcError;

use super::attr::{
    CreateHow, Fattr, FileHandle, FsInfo, FsStat, SetAttrs, SetTime, Special, Stability,
};
use super::client::{Describe, NfsClient};
use super::error::{ExportPath, NfsError};
use super::pool::Connection;

/// Wire bytes budgeted per entry of a READDIRPLUS page: the fixed fields (about 120 bytes with the
/// attributes), a handle of up to 64 bytes, and a name of average length.
const READDIRPLUS_ENTRY_BYTES: u32 = 256;
/// The largest READDIRPLUS reply asked for, whatever `max_entries` says.
const READDIRPLUS_MAX_BYTES: u32 = 1 << 20;

/// A server's write verifier: it changes when the server restarts, which tells a client that data
/// written UNSTABLE and not yet committed may be lost.
pub type WriteVerifier = [u8; 8];

/// The result of a WRITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Bytes the server took; possibly fewer than given (then write the rest at `offset + count`).
    pub count: u32,
    /// How durable the server made them: at least what was asked for.
    pub committed: Stability,
    pub verifier: WriteVerifier,
}

/// One entry of a READDIRPLUS page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntryPlus {
    /// One path component, never `.` or `..`.
    pub name: Vec<u8>,
    /// Passing this back as the cookie continues the listing after this entry.
    pub cookie: u64,
    pub handle: FileHandle,
    pub attr: Fattr,
}

/// One page of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirPagePlus {
    pub entries: Vec<DirEntryPlus>,
    /// Pass back with the next page's cookie.
    pub cookieverf: [u8; 8],
    /// The last entry of the directory is in this page.
    pub eof: bool,
}

/// What a call is about, for error messages; only rendered when a call fails.
#[derive(Clone, Copy)]
enum Subject<'a> {
    Handle(&'a FileHandle),
    Entry(&'a FileHandle, &'a [u8]),
}

impl Describe for Subject<'_> {
    fn describe(self) -> ExportPath {
        match self {
            Subject::Handle(fh) => ExportPath(fh.short()),
            Subject::Entry(dir, name) => {
                ExportPath(format!("{}/{}", dir.short(), String::from_utf8_lossy(name)))
            }
        }
    }
}

/// NFSv3 procedures on file handles; see the module documentation. Cheap to clone: clones share the
/// client's connection pool.
#[derive(Debug, Clone)]
pub struct HandleOps {
    client: NfsClient,
}

impl NfsClient {
    /// The handle-level operations on this client's export, sharing its connections and deadline.
    pub fn handle_ops(&self) -> HandleOps {
        HandleOps {
            client: self.clone(),
        }
    }
}

fn dirop<'a>(dir: &FileHandle, name: &'a [u8]) -> diropargs3<'a> {
    diropargs3 {
        dir: dir.to_fh3(),
        name: filename3(Opaque::borrowed(name)),
    }
}

fn opt<T: nfs3_client::nfs3_types::xdr_codec::Pack + nfs3_client::nfs3_types::xdr_codec::Unpack>(
    o: Nfs3Option<T>,
) -> Option<T> {
    match o {
        Nfs3Option::Some(v) => Some(v),
        Nfs3Option::None => None,
    }
}

impl HandleOps {
    /// The client these operations run on.
    pub fn client(&self) -> &NfsClient {
        &self.client
    }

    /// The export root's handle.
    pub async fn root(&self) -> Result<FileHandle, NfsError> {
        Ok(FileHandle::from_fh3(self.client.root().await?))
    }

    /// Finds `name` in directory `dir`.
    pub async fn lookup(
        &self,
        dir: &FileHandle,
        name: &[u8],
    ) -> Result<(FileHandle, Fattr), NfsError> {
        let subject = Subject::Entry(dir, name);
        self.check_name(name, subject)?;
        let ok = rpc!(
            self => procedure,
            "lookup",
            subject,
            lookup,
            LOOKUP3args {
                what: dirop(dir, name)
            }
        )
        .await?;
        let fh = FileHandle::from_fh3(ok.object);
        let attr = self.attr_or_getattr(opt(ok.obj_attributes), &fh).await?;
        Ok((fh, attr))
    }

    pub async fn getattr(&self, fh: &FileHandle) -> Result<Fattr, NfsError> {
        let ok = rpc!(
            self => procedure,
            "getattr",
            Subject::Handle(fh),
            getattr,
            GETATTR3args {
                object: fh.to_fh3()
            }
        )
        .await?;
        Ok(Fattr::from(&ok.obj_attributes))
    }

    /// Changes attributes (a `size` truncates or extends) and returns the new ones.
    pub async fn setattr(&self, fh: &FileHandle, set: &SetAttrs) -> Result<Fattr, NfsError> {
        let sattr = set.to_sattr3();
        let ok = rpc!(
            self => procedure,
            "setattr",
            Subject::Handle(fh),
            setattr,
            SETATTR3args {
                object: fh.to_fh3(),
                new_attributes: sattr.clone(),
                guard: Nfs3Option::None,
            }
        )
        .await?;
        self.attr_or_getattr(opt(ok.obj_wcc.after), fh).await
    }

    /// Reads up to `count` bytes at `offset`. Returns fewer at the end of the file (with `eof`), and may
    /// return fewer anywhere if `count` exceeds the server's `rtmax`.
    pub async fn read(
        &self,
        fh: &FileHandle,
        offset: u64,
        count: u32,
    ) -> Result<(Bytes, bool), NfsError> {
        let ok = rpc!(
            self => procedure,
            "read",
            Subject::Handle(fh),
            read,
            READ3args {
                file: fh.to_fh3(),
                offset,
                count,
            }
        )
        .await?;
        Ok((Bytes::from(ok.data.into_owned()), ok.eof))
    }

    /// Writes `data` at `offset`. At most the server's `wtmax` bytes go in one call: the reply's
    /// `count` says how many were taken, and the caller writes the rest.
    pub async fn write(
        &self,
        fh: &FileHandle,
        offset: u64,
        data: &[u8],
        stable: Stability,
    ) -> Result<Written, NfsError> {
        let wtmax = self.fsinfo().await?.wtmax.max(4096) as usize;
        let data = &data[..data.len().min(wtmax)];
        let ok = rpc!(
            self => procedure,
            "write",
            Subject::Handle(fh),
            write,
            WRITE3args {
                file: fh.to_fh3(),
                offset,
                // At most wtmax, a u32.
                count: data.len() as u32,
                stable: stable.to_wire(),
                data: Opaque::borrowed(data),
            }
        )
        .await?;
        if ok.count as usize > data.len() {
            return Err(self.client.protocol(
                "write",
                "",
                "the server claims to have written more bytes than it was sent",
            ));
        }
        Ok(Written {
            count: ok.count,
            committed: Stability::from_wire(ok.committed),
            verifier: ok.verf.0,
        })
    }

    /// Makes everything written to the file so far durable; returns the server's write verifier, to
    /// compare with the WRITE replies.
    pub async fn commit(&self, fh: &FileHandle) -> Result<WriteVerifier, NfsError> {
        let ok = rpc!(
            self => procedure,
            "commit",
            Subject::Handle(fh),
            commit,
            // Offset 0 and count 0: the whole file.
            COMMIT3args {
                file: fh.to_fh3(),
                offset: 0,
                count: 0,
            }
        )
        .await?;
        Ok(ok.verf.0)
    }

    /// Creates the regular file `name` in `dir`; see [`CreateHow`] for an existing name. With `Guarded`
    /// and `Exclusive` the new file ends up with the mode and owner in `attrs` even where the server
    /// applied a umask or ignored them; with `Exclusive` its times are the server's clock unless
    /// `attrs` says otherwise.
    pub async fn create(
        &self,
        dir: &FileHandle,
        name: &[u8],
        how: CreateHow,
        attrs: &SetAttrs,
    ) -> Result<(FileHandle, Fattr), NfsError> {
        let subject = Subject::Entry(dir, name);
        self.check_name(name, subject)?;
        let ok = rpc!(
            self => procedure,
            "create",
            subject,
            create,
            CREATE3args {
                where_: dirop(dir, name),
                how: match how {
                    CreateHow::Unchecked => createhow3::UNCHECKED(attrs.to_sattr3()),
                    CreateHow::Guarded => createhow3::GUARDED(attrs.to_sattr3()),
                    CreateHow::Exclusive(verifier) => createhow3::EXCLUSIVE(createverf3(verifier)),
                },
            }
        )
        .await?;
        let (fh, attr) = self
            .created(dir, name, opt(ok.obj), opt(ok.obj_attributes))
            .await?;
        match how {
            CreateHow::Unchecked => Ok((fh, attr)),
            CreateHow::Guarded => {
                let want = self
                    .setgid_rule(dir, opt(ok.dir_wcc.after), attrs, false)
                    .await?;
                self.fix_attrs(fh, attr, want).await
            }
            CreateHow::Exclusive(_) => {
                // The server keeps the verifier in the times (RFC 1813, 3.3.8): replace it.
                let mut set = self
                    .setgid_rule(dir, opt(ok.dir_wcc.after), attrs, false)
                    .await?;
                for time in [&mut set.atime, &mut set.mtime] {
                    if *time == SetTime::DontChange {
                        *time = SetTime::ServerTime;
                    }
                }
                let attr = self.apply_new_attrs(&fh, &set).await?;
                Ok((fh, attr))
            }
        }
    }

    /// Makes directory `name` in `dir` with the mode and owner in `attrs`.
    pub async fn mkdir(
        &self,
        dir: &FileHandle,
        name: &[u8],
        attrs: &SetAttrs,
    ) -> Result<(FileHandle, Fattr), NfsError> {
        let subject = Subject::Entry(dir, name);
        self.check_name(name, subject)?;
        let ok = rpc!(
            self => procedure,
            "mkdir",
            subject,
            mkdir,
            MKDIR3args {
                where_: dirop(dir, name),
                attributes: attrs.to_sattr3(),
            }
        )
        .await?;
        let (fh, attr) = self
            .created(dir, name, opt(ok.obj), opt(ok.obj_attributes))
            .await?;
        let want = self
            .setgid_rule(dir, opt(ok.dir_wcc.after), attrs, true)
            .await?;
        self.fix_attrs(fh, attr, want).await
    }

    /// Makes the special file `name` in `dir` (a FIFO, socket or device node) with the mode and owner in
    /// `attrs`. Servers may refuse devices to unprivileged callers, or special files altogether
    /// (NFS3ERR_NOTSUPP).
    pub async fn mknod(
        &self,
        dir: &FileHandle,
        name: &[u8],
        what: Special,
        attrs: &SetAttrs,
    ) -> Result<(FileHandle, Fattr), NfsError> {
        let subject = Subject::Entry(dir, name);
        self.check_name(name, subject)?;
        let ok = rpc!(self => procedure, "mknod", subject, mknod, {
            let sattr = attrs.to_sattr3();
            let device = |major: u32, minor: u32| devicedata3 {
                dev_attributes: sattr.clone(),
                spec: specdata3 {
                    specdata1: major,
                    specdata2: minor,
                },
            };
            MKNOD3args {
                where_: dirop(dir, name),
                what: match what {
                    Special::Fifo => mknoddata3::NF3FIFO(sattr.clone()),
                    Special::Socket => mknoddata3::NF3SOCK(sattr.clone()),
                    Special::CharDevice(major, minor) => mknoddata3::NF3CHR(device(major, minor)),
                    Special::BlockDevice(major, minor) => mknoddata3::NF3BLK(device(major, minor)),
                },
            }
        })
        .await?;
        let (fh, attr) = self
            .created(dir, name, opt(ok.obj), opt(ok.obj_attributes))
            .await?;
        let want = self
            .setgid_rule(dir, opt(ok.dir_wcc.after), attrs, false)
            .await?;
        self.fix_attrs(fh, attr, want).await
    }

    /// Makes the symbolic link `name` in `dir` pointing at `target`. Of `attrs`, only the owner is
    /// applied for certain: a symlink's mode means nothing on most servers.
    pub async fn symlink(
        &self,
        dir: &FileHandle,
        name: &[u8],
        target: &[u8],
        attrs: &SetAttrs,
    ) -> Result<(FileHandle, Fattr), NfsError> {
        let subject = Subject::Entry(dir, name);
        self.check_name(name, subject)?;
        let ok = rpc!(
            self => procedure,
            "symlink",
            subject,
            symlink,
            SYMLINK3args {
                where_: dirop(dir, name),
                symlink: symlinkdata3 {
                    symlink_attributes: attrs.to_sattr3(),
                    symlink_data: nfspath3(Opaque::borrowed(target)),
                },
            }
        )
        .await?;
        let (fh, attr) = self
            .created(dir, name, opt(ok.obj), opt(ok.obj_attributes))
            .await?;
        let want = self
            .setgid_rule(dir, opt(ok.dir_wcc.after), attrs, false)
            .await?;
        let owner = SetAttrs {
            uid: want.uid,
            gid: want.gid,
            ..SetAttrs::default()
        };
        self.fix_attrs(fh, attr, owner).await
    }

    /// The target of a symbolic link.
    pub async fn readlink(&self, fh: &FileHandle) -> Result<Vec<u8>, NfsError> {
        let ok = rpc!(
            self => procedure,
            "readlink",
            Subject::Handle(fh),
            readlink,
            READLINK3args {
                symlink: fh.to_fh3()
            }
        )
        .await?;
        Ok(ok.data.0.into_owned())
    }

    /// Adds the name `name` in `dir` for the object `fh` (a hard link); returns its new attributes.
    pub async fn link(
        &self,
        fh: &FileHandle,
        dir: &FileHandle,
        name: &[u8],
    ) -> Result<Fattr, NfsError> {
        let subject = Subject::Entry(dir, name);
        self.check_name(name, subject)?;
        let ok = rpc!(
            self => procedure,
            "link",
            subject,
            link,
            LINK3args {
                file: fh.to_fh3(),
                link: dirop(dir, name),
            }
        )
        .await?;
        self.attr_or_getattr(opt(ok.file_attributes), fh).await
    }

    /// Removes the non-directory `name` in `dir`.
    pub async fn remove(&self, dir: &FileHandle, name: &[u8]) -> Result<(), NfsError> {
        let subject = Subject::Entry(dir, name);
        self.check_name(name, subject)?;
        rpc!(
            self => procedure,
            "remove",
            subject,
            remove,
            REMOVE3args {
                object: dirop(dir, name)
            }
        )
        .await?;
        Ok(())
    }

    /// Removes the empty directory `name` in `dir`.
    pub async fn rmdir(&self, dir: &FileHandle, name: &[u8]) -> Result<(), NfsError> {
        let subject = Subject::Entry(dir, name);
        self.check_name(name, subject)?;
        rpc!(
            self => procedure,
            "rmdir",
            subject,
            rmdir,
            RMDIR3args {
                object: dirop(dir, name)
            }
        )
        .await?;
        Ok(())
    }

    /// Renames `from_name` in `from_dir` to `to_name` in `to_dir`, atomically replacing an existing
    /// target of a compatible kind.
    pub async fn rename(
        &self,
        from_dir: &FileHandle,
        from_name: &[u8],
        to_dir: &FileHandle,
        to_name: &[u8],
    ) -> Result<(), NfsError> {
        let subject = Subject::Entry(from_dir, from_name);
        self.check_name(from_name, subject)?;
        self.check_name(to_name, Subject::Entry(to_dir, to_name))?;
        rpc!(
            self => procedure,
            "rename",
            subject,
            rename,
            RENAME3args {
                from: dirop(from_dir, from_name),
                to: dirop(to_dir, to_name),
            }
        )
        .await?;
        Ok(())
    }

    /// Up to `max_entries` (at least one) entries of `dir` after `cookie` (0: from the start), with
    /// handles and attributes, without `.` and `..`. `cookieverf` is zero with cookie 0, otherwise the
    /// one the previous page returned. A page holds at least one entry unless it is the last.
    pub async fn readdirplus(
        &self,
        dir: &FileHandle,
        mut cookie: u64,
        mut cookieverf: [u8; 8],
        max_entries: u32,
    ) -> Result<DirPagePlus, NfsError> {
        let max_entries = max_entries.max(1);
        let maxcount = max_entries
            .saturating_mul(READDIRPLUS_ENTRY_BYTES)
            .saturating_add(512)
            .min(READDIRPLUS_MAX_BYTES);
        loop {
            let ok = rpc!(
                self => procedure,
                "readdirplus",
                Subject::Handle(dir),
                readdirplus,
                READDIRPLUS3args {
                    dir: dir.to_fh3(),
                    cookie,
                    cookieverf: cookieverf3(cookieverf),
                    // The name part of the reply; let the whole-reply budget decide.
                    dircount: maxcount,
                    maxcount,
                }
            )
            .await?;
            cookieverf = ok.cookieverf.0;
            let mut eof = ok.reply.eof;
            let raw = ok.reply.entries.into_inner();
            let Some(last) = raw.last() else {
                if eof {
                    return Ok(DirPagePlus {
                        entries: Vec::new(),
                        cookieverf,
                        eof,
                    });
                }
                // Neither entries nor the end: asking again with the same cookie would loop forever.
                return Err(self.client.protocol(
                    "readdirplus",
                    "",
                    "the server returned an empty page before the end of the directory",
                ));
            };
            cookie = last.cookie;
            let mut entries = Vec::with_capacity(raw.len());
            for e in raw {
                let name = e.name.0.into_owned();
                if name == b"." || name == b".." {
                    continue;
                }
                if entries.len() == max_entries as usize {
                    // More than asked for: the rest comes again after the last kept entry's cookie.
                    eof = false;
                    break;
                }
                // The server may leave out either part (RFC 1813, 3.3.17); then ask for it.
                let (handle, attr) = match (opt(e.name_handle), opt(e.name_attributes)) {
                    (Some(fh), Some(a)) => (FileHandle::from_fh3(fh), Fattr::from(&a)),
                    (Some(fh), None) => {
                        let fh = FileHandle::from_fh3(fh);
                        let attr = self.getattr(&fh).await?;
                        (fh, attr)
                    }
                    (None, _) => self.lookup(dir, &name).await?,
                };
                entries.push(DirEntryPlus {
                    name,
                    cookie: e.cookie,
                    handle,
                    attr,
                });
            }
            // A page of only `.` and `..` is not the end: continue after them.
            if !entries.is_empty() || eof {
                return Ok(DirPagePlus {
                    entries,
                    cookieverf,
                    eof,
                });
            }
        }
    }

    /// Space and inodes of the file system holding `fh`.
    pub async fn fsstat(&self, fh: &FileHandle) -> Result<FsStat, NfsError> {
        let ok = rpc!(
            self => procedure,
            "fsstat",
            Subject::Handle(fh),
            fsstat,
            FSSTAT3args {
                fsroot: fh.to_fh3()
            }
        )
        .await?;
        Ok(FsStat::from(&ok))
    }

    /// The server's limits and preferred transfer sizes for the export; asked once per client.
    pub async fn fsinfo(&self) -> Result<FsInfo, NfsError> {
        let info = self
            .client
            .fsinfo_cell()
            .get_or_try_init(|| async {
                let root = self.root().await?;
                let ok = rpc!(
                    self => procedure,
                    "fsinfo",
                    Subject::Handle(&root),
                    fsinfo,
                    FSINFO3args {
                        fsroot: root.to_fh3()
                    }
                )
                .await?;
                Ok::<_, NfsError>(FsInfo::from(&ok))
            })
            .await?;
        Ok(*info)
    }

    // ---- building blocks ----

    /// Runs one procedure through the client's call path (`NfsClient::call`: deadline, JUKEBOX retries,
    /// reconnecting) and turns an NFS error status into `NfsError::Status`.
    async fn procedure<T, E, F, Fut>(
        &self,
        op: &'static str,
        subject: Subject<'_>,
        f: F,
    ) -> Result<T, NfsError>
    where
        F: Fn(Connection) -> Fut,
        Fut: Future<Output = (Connection, Result<Nfs3Result<T, E>, RpcError>)>,
    {
        match self.client.call(op, subject, f).await? {
            Nfs3Result::Ok(ok) => Ok(ok),
            Nfs3Result::Err((status, _)) => Err(NfsError::Status {
                at: self.client.at(),
                op,
                path: subject.describe(),
                status,
            }),
        }
    }

    /// Refuses names that are not one path component before they reach the server.
    fn check_name(&self, name: &[u8], subject: Subject<'_>) -> Result<(), NfsError> {
        let reason = if name.is_empty() {
            "empty name"
        } else if name.contains(&b'/') {
            "a name must not contain '/'"
        } else if name.contains(&0) {
            "a name must not contain a NUL byte"
        } else {
            return Ok(());
        };
        Err(NfsError::InvalidPath {
            at: self.client.at(),
            path: subject.describe(),
            reason,
        })
    }

    async fn attr_or_getattr(
        &self,
        attr: Option<nfs3_client::nfs3_types::nfs3::fattr3>,
        fh: &FileHandle,
    ) -> Result<Fattr, NfsError> {
        match attr {
            Some(a) => Ok(Fattr::from(&a)),
            None => self.getattr(fh).await,
        }
    }

    /// The handle and attributes of an object just made, from the reply or, where the server left them
    /// out, from LOOKUP and GETATTR.
    async fn created(
        &self,
        dir: &FileHandle,
        name: &[u8],
        fh: Option<nfs3_client::nfs3_types::nfs3::nfs_fh3>,
        attr: Option<nfs3_client::nfs3_types::nfs3::fattr3>,
    ) -> Result<(FileHandle, Fattr), NfsError> {
        match fh {
            Some(fh) => {
                let fh = FileHandle::from_fh3(fh);
                let attr = self.attr_or_getattr(attr, &fh).await?;
                Ok((fh, attr))
            }
            None => self.lookup(dir, name).await,
        }
    }

    /// The attributes a new object in `dir` should have, by the rule of Linux's local filesystems (and of
    /// kernel NFS servers): in a directory with the setgid bit, it takes the directory's group instead of
    /// the caller's, and a new directory keeps the bit. A server with AUTH_UNIX applies the group the
    /// call asked for, so the client enforces this. `dir_after` is the directory's attributes from the
    /// reply; a GETATTR fetches them where the server left them out.
    async fn setgid_rule(
        &self,
        dir: &FileHandle,
        dir_after: Option<fattr3>,
        attrs: &SetAttrs,
        is_dir: bool,
    ) -> Result<SetAttrs, NfsError> {
        let (dir_mode, dir_gid) = match dir_after {
            Some(a) => (a.mode, a.gid),
            None => {
                let a = self.getattr(dir).await?;
                (a.mode, a.gid)
            }
        };
        let mut want = attrs.clone();
        if dir_mode & 0o2000 != 0 {
            want.gid = Some(dir_gid);
            if is_dir {
                want.mode = want.mode.map(|m| m | 0o2000);
            }
        }
        Ok(want)
    }

    /// Applies the mode, owner and size in `want` that a new object did not get (a server's umask, or
    /// a server that ignores the owner at creation).
    async fn fix_attrs(
        &self,
        fh: FileHandle,
        attr: Fattr,
        want: SetAttrs,
    ) -> Result<(FileHandle, Fattr), NfsError> {
        if want.satisfied_by(&attr) {
            return Ok((fh, attr));
        }
        let fix = SetAttrs {
            atime: SetTime::DontChange,
            mtime: SetTime::DontChange,
            ..want
        };
        let attr = self.apply_new_attrs(&fh, &fix).await?;
        Ok((fh, attr))
    }

    /// SETATTR for a new object. A change of owner clears setuid and setgid on the server (as chown(2)
    /// does), even within the same SETATTR: so when both are asked for, the owner goes first and the
    /// mode in a second call.
    async fn apply_new_attrs(&self, fh: &FileHandle, set: &SetAttrs) -> Result<Fattr, NfsError> {
        match set.mode {
            Some(mode) if mode & 0o6000 != 0 && (set.uid.is_some() || set.gid.is_some()) => {
                let owner = SetAttrs {
                    mode: None,
                    ..set.clone()
                };
                self.setattr(fh, &owner).await?;
                let mode = SetAttrs {
                    mode: Some(mode),
                    ..SetAttrs::default()
                };
                self.setattr(fh, &mode).await
            }
            _ => self.setattr(fh, set).await,
        }
    }
}
