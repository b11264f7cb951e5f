//! The parts of the `ebs` backend that live on this host: which 512 KiB blocks of a volume's image
//! changed since it was last shipped to an EBS snapshot. The backend that ships and pulls them is built
//! on these.

pub mod blockmap;
