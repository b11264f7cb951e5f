//! Tier "peers": the nfs and ebs backends against the real peers they talk to, which the tests start
//! themselves: NFS-Ganesha (with its lock manager), moto, the strict EBS emulator, and etcd clusters with
//! hosts in network namespaces for cluster mode; FUSE mounts of nfs volumes used as applications use them. Needs root, /dev/fuse and the packages scripts/deps installs (see
//! tests/common/tier.rs for what happens without them).

#[path = "../common/cluster.rs"]
mod cluster;
#[path = "../common/mod.rs"]
mod common;
#[path = "../common/ebs_strict.rs"]
mod ebs_strict;
#[path = "../common/moto.rs"]
mod moto;
#[macro_use]
#[path = "../nfs_support/mod.rs"]
mod nfs_support;
#[allow(dead_code)]
#[macro_use]
#[path = "../common/tier.rs"]
mod tier;

mod cluster_infra;
mod cluster_mode;
mod cluster_security;
mod ebs_backend;
mod ebs_history;
mod nfs_backend;
mod nfs_client;
mod nfs_fuse;
mod nfs_hosts;
mod nfs_locks;
mod nfs_ops;
mod nfs_posix;
mod nfs_workloads;

tier_gate!(
    "peers",
    [
        Need::Root,
        Need::Device("/dev/fuse"),
        Need::Program("ganesha.nfsd", "nfs-ganesha"),
        Need::Program("rpcbind", "rpcbind"),
        Need::Program("fio", "fio"),
        Need::Program("stress-ng", "stress-ng"),
        Need::Program("sqlite3", "sqlite3"),
        Need::Program("etcd", "etcd-server"),
        Need::Program("etcdctl", "etcd-client"),
        Need::Program("ip", "iproute2"),
        Need::Program("openssl", "openssl"),
    ],
    None
);
