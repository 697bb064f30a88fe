//! One TCP connection carried between the two sides of a tunnel end: a socket of the
//! userspace stack (the tunnel side) and an ordinary socket (this machine's side: the
//! cluster for Stowaway, a local program for the userspace client). Bytes are copied a
//! bounded share per call, so that one busy connection cannot keep the others waiting;
//! a FIN on either side is passed on as one, an error on this machine's side resets the
//! tunnel side.

use std::io::{self, Read, Write};
use std::net::Shutdown;

use mio::net::TcpStream;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

/// A stack socket with the buffers given, tuned for a tunnel: no Nagle (the other side
/// decides), no delayed ACKs, CUBIC, keep-alives every `keep_alive` if given.
pub fn tcp_socket(
    receive_buffer: usize,
    send_buffer: usize,
    keep_alive: Option<smoltcp::time::Duration>,
) -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; receive_buffer]),
        tcp::SocketBuffer::new(vec![0; send_buffer]),
    );
    socket.set_nagle_enabled(false);
    socket.set_congestion_control(tcp::CongestionControl::Cubic);
    socket.set_ack_delay(None);
    socket.set_keep_alive(keep_alive);
    socket
}

/// Bytes moved by one [`Splice::pump`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// From the tunnel to this machine's socket.
    pub to_stream: usize,
    /// From this machine's socket into the tunnel.
    pub to_tunnel: usize,
    /// A FIN or a reset was passed on (something happened even if no byte moved).
    pub ended_a_side: bool,
}

impl Moved {
    pub fn any(&self) -> bool {
        self.to_stream > 0 || self.to_tunnel > 0 || self.ended_a_side
    }
}

/// A TCP connection across the two sides.
pub struct Splice {
    /// The tunnel side: a socket of the stack.
    pub socket: SocketHandle,
    /// This machine's side.
    pub stream: TcpStream,
    /// Edge-triggered readiness of `stream` not yet used up.
    pub readable: bool,
    pub writable: bool,
    /// This machine's side finished sending (a FIN is queued into the tunnel).
    pub stream_done: bool,
    /// The tunnel side finished sending and it was passed on (`stream` shut down for
    /// writing).
    pub tunnel_done: bool,
}

impl Splice {
    pub fn new(socket: SocketHandle, stream: TcpStream) -> Self {
        Self {
            socket,
            stream,
            readable: true,
            writable: true,
            stream_done: false,
            tunnel_done: false,
        }
    }

    /// Copies what is ready both ways, at most `share` bytes each way.
    pub fn pump(&mut self, socket: &mut tcp::Socket, share: usize) -> Moved {
        let mut moved = Moved::default();
        self.tunnel_to_stream(socket, share, &mut moved);
        self.stream_to_tunnel(socket, share, &mut moved);
        moved
    }

    /// Bytes that came through the tunnel, on to this machine's socket; the tunnel side's
    /// FIN becomes a write shutdown.
    fn tunnel_to_stream(&mut self, socket: &mut tcp::Socket, share: usize, moved: &mut Moved) {
        let mut left = share;
        while left > 0 && self.writable && socket.can_recv() {
            let stream = &mut self.stream;
            match socket.recv(|bytes| {
                let bytes = &bytes[..bytes.len().min(left)];
                match stream.write(bytes) {
                    Ok(written) => (written, Ok(written)),
                    Err(error) => (0, Err(error)),
                }
            }) {
                Ok(Ok(0)) => break,
                Ok(Ok(written)) => {
                    moved.to_stream = moved.to_stream.saturating_add(written);
                    left = left.saturating_sub(written);
                }
                Ok(Err(error)) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.writable = false;
                }
                Ok(Err(error)) if error.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(_)) => {
                    socket.abort();
                    moved.ended_a_side = true;
                    return;
                }
                Err(_) => break,
            }
        }
        if !self.tunnel_done && matches!(socket.recv(|_| (0, ())), Err(tcp::RecvError::Finished)) {
            self.tunnel_done = true;
            let _ = self.stream.shutdown(Shutdown::Write);
            moved.ended_a_side = true;
        }
    }

    /// Bytes this machine's socket sent, on into the tunnel; its end becomes a FIN.
    fn stream_to_tunnel(&mut self, socket: &mut tcp::Socket, share: usize, moved: &mut Moved) {
        let mut left = share;
        while left > 0 && self.readable && !self.stream_done && socket.can_send() {
            let stream = &mut self.stream;
            match socket.send(|room| {
                let limit = room.len().min(left);
                match stream.read(&mut room[..limit]) {
                    Ok(read) => (read, Ok(read)),
                    Err(error) => (0, Err(error)),
                }
            }) {
                Ok(Ok(0)) => {
                    self.stream_done = true;
                    socket.close();
                    moved.ended_a_side = true;
                }
                Ok(Ok(read)) => {
                    moved.to_tunnel = moved.to_tunnel.saturating_add(read);
                    left = left.saturating_sub(read);
                }
                Ok(Err(error)) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                }
                Ok(Err(error)) if error.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(_)) => {
                    socket.abort();
                    moved.ended_a_side = true;
                    return;
                }
                Err(_) => break,
            }
        }
    }
}
