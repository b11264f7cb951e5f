//! Docker's volume-plugin protocol and nothing else: the wire types, the routing of POST paths to a typed
//! request, and the HTTP server on the Unix socket. It turns requests into `VolumeService` calls and
//! results into Docker's JSON; it makes no decision about volumes itself.

pub mod router;
pub mod server;
pub mod wire;

pub use router::{route, Request, RouteError};
pub use server::serve;
