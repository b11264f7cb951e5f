//! systemd readiness notification (`sd_notify`), without linking libsystemd: one datagram to the socket
//! named by `NOTIFY_SOCKET`. Does nothing when the variable is unset, as when not run by systemd.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends a notification such as `READY=1` if systemd asked for one. Failures are logged, never fatal:
/// a missing notification costs a start-up timeout, a crash would cost the plugin.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        let bytes = path.as_encoded_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            // A leading '@' names a socket in the abstract namespace.
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(&path)?,
        };
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
