//! The kernel data path: the arguments of a mount(2) of type `nfs` with every option spelled out, so
//! nothing depends on `mount.nfs` or on the kernel's defaults. The backend's `Mounter` performs it. This
//! machine's kernel has no NFS client, so the exact arguments are unit-tested and the mount itself is made
//! only where `/proc/filesystems` lists `nfs`.

use std::time::Duration;

use nix::mount::MsFlags;

use crate::mount::MountArgs;

/// How many retransmissions a soft mount makes before failing an operation with EIO.
const RETRANS: u32 = 1;

/// The mount(2) arguments for `server:export/dir`. `timeout` bounds how long an operation waits on an
/// unreachable server: with a soft mount an operation fails after `retrans + 1` timeouts of `timeo`.
pub fn mount_args(
    server: &str,
    export: &str,
    dir: &str,
    nfs_port: Option<u16>,
    mount_port: Option<u16>,
    timeout: Duration,
) -> MountArgs {
    let path = format!("{}/{}", export.trim_end_matches('/'), dir);
    // An IPv6 server is written in brackets in the source, never in addr=.
    let source = if server.contains(':') {
        format!("[{server}]:{path}")
    } else {
        format!("{server}:{path}")
    };
    // timeo is in tenths of a second, at least one.
    let timeo = (timeout.as_millis() / 100 / u128::from(RETRANS + 1)).max(1);
    let mut opts = vec![
        "vers=3".to_string(),
        "proto=tcp".into(),
        "mountproto=tcp".into(),
        // No lock manager: ganesha and many appliances run without NLM, and a container's flock needs none
        // across hosts for single-writer volumes.
        "nolock".into(),
        "soft".into(),
        format!("timeo={timeo}"),
        format!("retrans={RETRANS}"),
        format!("addr={server}"),
        format!("mountaddr={server}"),
    ];
    if let Some(p) = nfs_port {
        opts.push(format!("port={p}"));
    }
    if let Some(p) = mount_port {
        opts.push(format!("mountport={p}"));
    }
    MountArgs {
        source,
        fstype: "nfs",
        flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        data: opts.join(","),
    }
}

/// Whether this kernel has an NFS client now.
pub fn available(filesystems: &str) -> bool {
    filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("nfs"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_arguments() {
        let m = mount_args(
            "10.0.0.5",
            "/srv/nfs/",
            "db",
            Some(12049),
            Some(12050),
            Duration::from_secs(10),
        );
        assert_eq!(m.source, "10.0.0.5:/srv/nfs/db");
        assert_eq!(m.fstype, "nfs");
        assert_eq!(m.flags, MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
        assert_eq!(
            m.data,
            "vers=3,proto=tcp,mountproto=tcp,nolock,soft,timeo=50,retrans=1,addr=10.0.0.5,\
             mountaddr=10.0.0.5,port=12049,mountport=12050"
        );
        let v6 = mount_args(
            "fd00::5",
            "/x",
            "a/b",
            None,
            None,
            Duration::from_millis(50),
        );
        assert_eq!(v6.source, "[fd00::5]:/x/a/b");
        assert_eq!(
            v6.data,
            "vers=3,proto=tcp,mountproto=tcp,nolock,soft,timeo=1,retrans=1,addr=fd00::5,mountaddr=fd00::5"
        );
    }

    #[test]
    fn detects_the_kernel_client() {
        assert!(available("nodev\tnfs\nnodev\tnfs4\n"));
        assert!(!available("nodev\tfuse\n\text4\n"));
    }
}
