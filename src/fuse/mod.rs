//! FUSE: serves a `FileStore` as a mounted filesystem, for backends whose data the kernel cannot mount itself
//! (NFS on a kernel without an NFS client). This step holds only the store contract and the in-memory store.

pub mod memory;
pub mod store;
