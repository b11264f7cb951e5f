//! The TCP transport handed to `nfs3_client`. It owns one thing the crate's own tokio connector gets wrong:
//! a connection the server closed must become an error, not an endless loop.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use nfs3_client::io::{AsyncRead, AsyncWrite};
use nfs3_client::net::Connector;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

/// Bytes read from the socket at once. `nfs3_client` reads each reply as its 4-byte record mark and then
/// its body: unbuffered, that is two `recv` calls per RPC where one does, as a 4 KiB READ reply and its mark
/// arrive together. A bigger reply (1 MiB READs) bypasses the buffer once it is empty.
const READ_BUFFER: usize = 64 * 1024;

/// Connects to NFS and MOUNT services over TCP with `TCP_NODELAY`.
///
/// `nfs3_client` 0.9 reads with a loop that stops only when the buffer is full, so a 0-byte read (the
/// server closed the connection) makes it spin at 100% CPU forever. [`TcpStreamIo`] reports that read
/// as `UnexpectedEof` instead, and a 0-byte write as `WriteZero`, so the call fails in microseconds and the
/// pool can drop the connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpConnector;

/// One TCP stream, read (through a buffer) and written through `nfs3_client`'s I/O traits. The client
/// makes one call at a time per connection and reads its whole reply, so the buffer never holds bytes of a
/// later reply when a call ends.
#[derive(Debug)]
pub struct TcpStreamIo(BufReader<TcpStream>);

impl TcpStreamIo {
    fn new(stream: TcpStream) -> io::Result<Self> {
        // RPC calls are small request/response pairs: Nagle's algorithm would hold each one back.
        stream.set_nodelay(true)?;
        Ok(Self(BufReader::with_capacity(READ_BUFFER, stream)))
    }
}

impl Connector for TcpConnector {
    type Connection = TcpStreamIo;

    async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStreamIo> {
        TcpStreamIo::new(TcpStream::connect(addr).await?)
    }

    async fn connect_with_port(
        &self,
        addr: SocketAddr,
        local_port: u16,
    ) -> io::Result<TcpStreamIo> {
        // Only used when the server demands a privileged source port; the bind then needs root.
        let (socket, any) = match addr.ip() {
            IpAddr::V4(_) => (TcpSocket::new_v4()?, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            IpAddr::V6(_) => (TcpSocket::new_v6()?, IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        };
        socket.bind(SocketAddr::new(any, local_port))?;
        TcpStreamIo::new(socket.connect(addr).await?)
    }
}

impl AsyncRead for TcpStreamIo {
    async fn async_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        match self.0.read(buf).await? {
            0 => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            )),
            n => Ok(n),
        }
    }
}

impl AsyncWrite for TcpStreamIo {
    async fn async_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        match self.0.write(buf).await? {
            0 => Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the connection accepts no more data",
            )),
            n => Ok(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// The defect this connector exists for: a peer that closes must produce an error, promptly.
    #[tokio::test]
    async fn a_closed_connection_is_an_error_not_a_spin() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            drop(stream);
        });
        let mut io = TcpConnector.connect(addr).await.unwrap();
        accept.await.unwrap();
        let mut buf = [0u8; 4];
        let err = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            io.async_read_exact(&mut buf),
        )
        .await
        .expect("read_exact must fail, not spin")
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
