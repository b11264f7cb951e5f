//! Tier "dockerd": Ferry used through the machine's real dockerd and the `docker` and `docker-compose`
//! tools, as users use it: a legacy plugin, the managed plugin, and two Docker "hosts" (a second dockerd)
//! sharing nfs and ebs volumes. Needs root and a dockerd answering on /var/run/docker.sock;
//! `FERRY_SKIP_DOCKER=1` skips the tier on purpose (see tests/common/tier.rs).

#[path = "../common/cluster.rs"]
mod cluster;
#[path = "../common/mod.rs"]
mod common;
#[path = "../common/docker2.rs"]
mod docker2;
#[allow(dead_code)]
#[path = "../common/e2e.rs"]
mod e2e;
#[path = "../common/moto.rs"]
mod moto;
#[allow(dead_code)]
#[macro_use]
#[path = "../common/tier.rs"]
mod tier;

use common::ganesha;

mod docker;
mod ebs_docker;
mod managed_plugin;
mod nfs_docker;
mod second_dockerd;
mod swarm;

tier_gate!(
    "dockerd",
    [
        Need::Root,
        Need::Device("/dev/fuse"),
        Need::Dockerd,
        Need::Program("busybox", "busybox-static"),
        Need::Program("ganesha.nfsd", "nfs-ganesha"),
        Need::Program("docker-compose", "docker-compose"),
        Need::Program("etcd", "etcd-server"),
        Need::Program("etcdctl", "etcd-client"),
    ],
    Some("FERRY_SKIP_DOCKER")
);
