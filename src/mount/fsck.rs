//! Signs of a damaged filesystem in a volume image, and the repair check run before mounting one.
//!
//! Reads what the kernel records about errors (an ext4 superblock's state and error count, an xfs
//! superblock's needs-repair flag, ext4's `errors_count` in sysfs for a mounted filesystem) and runs
//! `e2fsck -p -f` or `xfs_repair -n` on an unmounted image. It decides nothing: the backend chooses when to
//! check and what to do with a verdict. Nothing here may run on a mounted image's filesystem but the sysfs
//! reads.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{find_tool, MountError};
use crate::spec::FsType;

/// Where the ext4 superblock starts in the image, and the offsets of the fields read from it (struct
/// ext4_super_block in the kernel's fs/ext4/ext4.h, little-endian).
const EXT4_SUPERBLOCK: u64 = 1024;
const EXT4_MAGIC_AT: usize = 0x38;
const EXT4_STATE_AT: usize = 0x3A;
const EXT4_ERROR_COUNT_AT: usize = 0x194;
const EXT4_MAGIC: u16 = 0xEF53;
/// s_state bits: cleanly unmounted, and errors detected.
const EXT4_VALID_FS: u16 = 0x0001;
const EXT4_ERROR_FS: u16 = 0x0002;

/// The xfs superblock (struct xfs_dsb, big-endian) starts the image; its incompatible-features word holds
/// the flag xfs sets when it found metadata it could not trust.
const XFS_MAGIC: &[u8; 4] = b"XFSB";
const XFS_INCOMPAT_AT: usize = 216;
const XFS_INCOMPAT_NEEDSREPAIR: u32 = 1 << 4;

/// What a repair check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FsCheck {
    /// Nothing was wrong.
    Clean,
    /// Problems were found and repaired; the tool's last words.
    Repaired(String),
    /// Problems were found that the check did not repair; the tool and its last words.
    Damaged { tool: &'static str, detail: String },
}

/// Why an ext4 image should be checked before it is mounted, from its superblock: the kernel recorded
/// errors in it, or it is not marked clean. `None` when nothing is recorded, or when the image holds no
/// ext4 superblock (that is for mount to report).
pub fn ext4_needs_check(image: &Path) -> std::io::Result<Option<String>> {
    let mut sb = [0u8; 1024];
    File::open(image)?.read_exact_at(&mut sb, EXT4_SUPERBLOCK)?;
    let u16_at = |at: usize| u16::from_le_bytes([sb[at], sb[at + 1]]);
    if u16_at(EXT4_MAGIC_AT) != EXT4_MAGIC {
        return Ok(None);
    }
    let state = u16_at(EXT4_STATE_AT);
    let errors = u32::from_le_bytes([
        sb[EXT4_ERROR_COUNT_AT],
        sb[EXT4_ERROR_COUNT_AT + 1],
        sb[EXT4_ERROR_COUNT_AT + 2],
        sb[EXT4_ERROR_COUNT_AT + 3],
    ]);
    Ok(if errors > 0 {
        Some(format!(
            "its superblock records {errors} filesystem error(s)"
        ))
    } else if state & EXT4_ERROR_FS != 0 {
        Some("its superblock says it has errors".into())
    } else if state & EXT4_VALID_FS == 0 {
        Some("its superblock is not marked clean".into())
    } else {
        None
    })
}

/// Whether an xfs image carries the needs-repair flag.
pub fn xfs_needs_repair(image: &Path) -> std::io::Result<bool> {
    let mut sb = [0u8; 512];
    File::open(image)?.read_exact_at(&mut sb, 0)?;
    if &sb[..4] != XFS_MAGIC {
        return Ok(false);
    }
    let at = XFS_INCOMPAT_AT;
    let incompat = u32::from_be_bytes([sb[at], sb[at + 1], sb[at + 2], sb[at + 3]]);
    Ok(incompat & XFS_INCOMPAT_NEEDSREPAIR != 0)
}

/// How many errors a mounted ext4 filesystem has logged since it was made (or last repaired), from sysfs;
/// `device` is its source in the mount table, such as `/dev/loop3`. `None` when sysfs does not say.
pub fn ext4_errors_logged(device: &str) -> Option<u64> {
    let name = Path::new(device).file_name()?;
    let path = PathBuf::from("/sys/fs/ext4")
        .join(name)
        .join("errors_count");
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The last lines of a tool's output, enough to say what it found without flooding an error message.
fn last_words(out: &std::process::Output) -> String {
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    // xfs_repair says what matters in an ERROR or ALERT paragraph and then goes on through its phases;
    // e2fsck ends with its verdict.
    let picked = match lines
        .iter()
        .position(|l| l.starts_with("ERROR") || l.starts_with("ALERT"))
    {
        Some(at) => &lines[at..lines.len().min(at + 3)],
        None => &lines[lines.len().saturating_sub(4)..],
    };
    picked.join(" ").chars().take(600).collect()
}

/// Checks the filesystem in an unmounted image: `e2fsck -p -f` repairs what is safe to repair without
/// asking; `xfs_repair -n` only looks.
pub fn check(image: &Path, fs: FsType) -> Result<FsCheck, MountError> {
    let (tool, package, args): (&'static str, &'static str, &[&str]) = match fs {
        FsType::Ext4 => ("e2fsck", "e2fsprogs", &["-p", "-f"]),
        FsType::Xfs => ("xfs_repair", "xfsprogs", &["-n"]),
    };
    let path = find_tool(tool).ok_or(MountError::ToolMissing { tool, package })?;
    // The verdict comes from the exit status; the words are only shown, but in one language.
    let out = Command::new(path)
        .args(args)
        .arg(image)
        .env("LC_ALL", "C")
        .output()?;
    let words = last_words(&out);
    let verdict = match (fs, out.status.code()) {
        (_, Some(0)) => Some(FsCheck::Clean),
        // e2fsck's exit status is a bit mask: 1 and 2 errors corrected, 4 errors left uncorrected, 8 and
        // up an operational failure.
        (FsType::Ext4, Some(c)) if c & 4 != 0 => Some(FsCheck::Damaged {
            tool,
            detail: words.clone(),
        }),
        (FsType::Ext4, Some(c)) if c & !3 == 0 => Some(FsCheck::Repaired(words.clone())),
        // xfs_repair -n: 1 corruption found, 2 a dirty log that must be replayed by a mount first.
        (FsType::Xfs, Some(1 | 2)) => Some(FsCheck::Damaged {
            tool,
            detail: words.clone(),
        }),
        _ => None,
    };
    let verdict = verdict.ok_or_else(|| MountError::Tool {
        tool,
        path: image.to_path_buf(),
        detail: format!("{words} ({})", out.status),
    })?;
    if fs == FsType::Ext4 && verdict != FsCheck::Clean {
        // e2fsck makes `lost+found` again where it is missing, and Ferry's volumes start without one (see
        // `remove_lost_found`). One it made empty goes again; one holding what the repair recovered stays,
        // and so does any the tool cannot remove.
        if let Err(e) = super::remove_lost_found(image) {
            tracing::debug!(image = %image.display(), error = %e, "lost+found stays after the check");
        }
    }
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(tool: &str, args: &[&str], image: &Path) {
        let out = Command::new(find_tool(tool).unwrap())
            .args(args)
            .arg(image)
            .output()
            .unwrap();
        assert!(out.status.success(), "{tool} {args:?}: {out:?}");
    }

    fn ext4_image(dir: &Path) -> PathBuf {
        let image = dir.join("disk.img");
        File::create(&image).unwrap().set_len(32 << 20).unwrap();
        run("mkfs.ext4", &["-q", "-F"], &image);
        image
    }

    /// The offsets read here are the ones e2fsprogs writes: a fresh image is clean, and what debugfs sets
    /// (the error flag, an error count, an unclean state) is seen; e2fsck clears it again.
    #[test]
    fn reads_what_e2fsprogs_writes_in_the_superblock() {
        let dir = tempfile::tempdir().unwrap();
        let image = ext4_image(dir.path());
        assert_eq!(ext4_needs_check(&image).unwrap(), None);
        assert!(!xfs_needs_repair(&image).unwrap());

        run("debugfs", &["-w", "-R", "ssv error_count 3"], &image);
        let why = ext4_needs_check(&image).unwrap().unwrap();
        assert!(why.contains("3 filesystem error(s)"), "{why}");
        assert!(matches!(
            check(&image, FsType::Ext4).unwrap(),
            FsCheck::Clean | FsCheck::Repaired(_)
        ));
        assert_eq!(ext4_needs_check(&image).unwrap(), None);

        run("debugfs", &["-w", "-R", "ssv state 0"], &image);
        let why = ext4_needs_check(&image).unwrap().unwrap();
        assert!(why.contains("not marked clean"), "{why}");
        run("debugfs", &["-w", "-R", "ssv state 3"], &image);
        assert!(ext4_needs_check(&image).unwrap().is_some());
    }

    /// Damage `e2fsck -p` must not fix by itself (a cleared root inode) is reported as damaged, with its
    /// words, not as a failure to run the tool.
    #[test]
    fn damage_e2fsck_will_not_repair_alone_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let image = ext4_image(dir.path());
        run("debugfs", &["-w", "-R", "clri <2>"], &image);
        match check(&image, FsType::Ext4).unwrap() {
            FsCheck::Damaged { tool, detail } => {
                assert_eq!(tool, "e2fsck");
                assert!(detail.contains("MANUALLY"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// e2fsck makes `lost+found` again when it repairs; a volume's root stays as empty as it was made.
    #[test]
    fn a_repair_leaves_the_root_without_lost_found() {
        let dir = tempfile::tempdir().unwrap();
        let image = ext4_image(dir.path());
        super::super::remove_lost_found(&image).unwrap();
        run("debugfs", &["-w", "-R", "ssv state 2"], &image);
        assert!(matches!(
            check(&image, FsType::Ext4).unwrap(),
            FsCheck::Repaired(_)
        ));
        let out = Command::new(find_tool("debugfs").unwrap())
            .args(["-R", "ls -p /"])
            .arg(&image)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(!listing.contains("lost+found"), "{listing}");
        assert_eq!(ext4_needs_check(&image).unwrap(), None);
    }

    #[test]
    fn no_superblock_is_not_a_reason_to_check() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("zeros.img");
        File::create(&image).unwrap().set_len(1 << 20).unwrap();
        assert_eq!(ext4_needs_check(&image).unwrap(), None);
        assert!(!xfs_needs_repair(&image).unwrap());
        assert_eq!(ext4_errors_logged("/dev/no-such-device"), None);
    }
}
