//! Reading the WireGuard socket in batches: one `recvmmsg` takes up to `BATCH` datagrams,
//! each into its own 64 KiB buffer (no datagram is cut short, whatever a peer sends).

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use mio::net::UdpSocket;
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};

/// Datagrams taken by one system call.
const BATCH: usize = 32;
/// The largest UDP datagram.
const DATAGRAM: usize = 65_536;

pub(super) struct Reader {
    headers: MultiHeaders<SockaddrStorage>,
    /// `BATCH` buffers of `DATAGRAM` bytes, one after the other (one allocation, whose
    /// pages are only touched as far as datagrams reach).
    buffers: Vec<u8>,
    /// Each datagram of the last read: its length and sender.
    received: Vec<(usize, Option<SocketAddr>)>,
}

impl Reader {
    pub fn new() -> Self {
        Self {
            headers: MultiHeaders::preallocate(BATCH, None),
            buffers: vec![0; BATCH * DATAGRAM],
            received: Vec::with_capacity(BATCH),
        }
    }

    /// Reads what the socket holds, up to `BATCH` datagrams; `WouldBlock` when nothing.
    pub fn read(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        let mut slices: Vec<[IoSliceMut<'_>; 1]> = self
            .buffers
            .chunks_mut(DATAGRAM)
            .map(|buffer| [IoSliceMut::new(buffer)])
            .collect();
        let messages = recvmmsg(
            socket.as_raw_fd(),
            &mut self.headers,
            slices.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(io::Error::from)?;
        self.received.clear();
        for message in messages {
            let from = message.address.as_ref().and_then(socket_address);
            self.received.push((message.bytes, from));
        }
        Ok(self.received.len())
    }

    /// The datagrams of the last read, with their senders (one whose sender is no IP
    /// address is left out).
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.received
            .iter()
            .zip(self.buffers.chunks(DATAGRAM))
            .filter_map(|((length, from), buffer)| Some(((*from)?, buffer.get(..*length)?)))
    }
}

fn socket_address(address: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = address.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    address
        .as_sockaddr_in6()
        .map(|v6| SocketAddr::V6((*v6).into()))
}
