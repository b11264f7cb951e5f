//! Support for the NFS data-path tests (`nfs_client`, `nfs_ops`, `nfs_fuse`): the shared Ganesha harness
//! under the name these tests use, a macro that starts one or skips, and position-dependent test data.

#![allow(dead_code)]

#[path = "../common/ganesha.rs"]
mod ganesha;

pub use ganesha::Ganesha as Server;

macro_rules! server_or_skip {
    () => {
        match nfs_support::Server::start() {
            Some(server) => server,
            None => return,
        }
    };
}

/// Deterministic, position-dependent bytes (xorshift per 8-byte word, seeded by the word's offset), so
/// a chunk in the wrong place or a stale page is caught, not only a wrong length.
pub fn pattern(offset: u64, len: usize, seed: u64) -> Vec<u8> {
    assert_eq!(offset % 8, 0);
    let mut out = Vec::with_capacity(len + 8);
    let mut word = offset / 8;
    while out.len() < len {
        let mut x = (word ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
        word += 1;
    }
    out.truncate(len);
    out
}
