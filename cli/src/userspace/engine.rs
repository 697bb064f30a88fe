//! The userspace client's data plane: one thread, one event loop (mio) over a plain UDP
//! socket to Stowaway and this machine's TCP connections. It speaks WireGuard itself
//! (`gefyra_netstack::session`) and carries TCP with a userspace stack: nothing needs a TUN
//! device, a capability, a route or a resolver change, and nothing in it is Linux-only.
//!
//! What it does for the rest of the CLI (the proxies and forwards run on tokio and hand
//! their connections in through [`Handle`]):
//! - `Open`: an accepted local connection, carried to a cluster address through the tunnel
//!   (the stack connects from the tunnel address); a proxy's reply is written first.
//! - `Resolve`: a name looked up at the cluster's DNS (192.168.99.1) through the tunnel.
//! - exposed ports: a connection that arrives through the tunnel at the tunnel address on
//!   an exposed port is handed to `127.0.0.1:LOCAL` on this machine.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::noise::Tunn;
use boringtun::x25519::{PublicKey, StaticSecret};
use gefyra_netstack::device::Queues;
use gefyra_netstack::packet::{self, Inbound};
use gefyra_netstack::session::{self, Decapsulated, Timers};
use gefyra_netstack::splice::{Splice, tcp_socket};
use mio::net::{TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::{dns, tcp};
use smoltcp::wire::{DnsQueryType, IpAddress, IpEndpoint, IpListenEndpoint};
use tokio::sync::oneshot;

const TUNNEL: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_FLOW: usize = 2;
/// The largest datagram.
const DATAGRAM: usize = 65_536;
/// Per-connection stack buffers: the receive window offered to the cluster side and the
/// data in flight towards it.
const RECEIVE_BUFFER: usize = 1 << 20;
const SEND_BUFFER: usize = 256 << 10;
/// Bytes one connection moves each way per round, so that none keeps the others waiting.
const SHARE: usize = 64 << 10;
/// Rounds of stack polling and copying in one turn of the loop.
const ROUNDS: usize = 32;
/// Connections open at once (proxied, forwarded and exposed together): what the cluster
/// side can make this machine hold.
pub const MAX_CONNECTIONS: usize = 1024;
/// Exposed connections arriving from the cluster open at once.
const MAX_EXPOSED: usize = 256;
/// A connection through the tunnel not established within this is given up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// A name lookup at the cluster's DNS.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Lookups in flight at once.
const LOOKUPS: usize = 16;
/// WireGuard's timers tick in quarter seconds.
const TICK: Duration = Duration::from_millis(250);
/// Keep-alives on an otherwise quiet tunnel (a NAT on the way forgets an idle mapping).
const PERSISTENT_KEEPALIVE: u16 = 25;
/// A session that gave up (no answer for 90 s) tries a new handshake this often.
const RETRY_HANDSHAKE: Duration = Duration::from_secs(5);
/// Requests waiting for the loop.
const REQUESTS: usize = 256;

/// What the tunnel needs: the client's keys and address, Stowaway's key and address.
#[derive(Clone)]
pub struct Config {
    pub private_key: [u8; 32],
    pub server_public_key: [u8; 32],
    pub preshared_key: Option<[u8; 32]>,
    /// Stowaway's WireGuard address.
    pub endpoint: SocketAddr,
    /// The client's tunnel address.
    pub address: Ipv4Addr,
    /// The cluster's DNS through the tunnel (Stowaway's tunnel address).
    pub dns: Ipv4Addr,
    pub mtu: usize,
    /// Exposed ports: the port on the tunnel address → the port on 127.0.0.1.
    pub exposes: BTreeMap<u16, u16>,
}

/// What the rest of the CLI asks of the loop.
pub enum Request {
    /// Carry `stream` to `target` through the tunnel; write `on_open` to it once the
    /// connection is established, `on_fail` (then close it) if it cannot be.
    Open {
        target: SocketAddr,
        stream: std::net::TcpStream,
        on_open: Vec<u8>,
        on_fail: Vec<u8>,
    },
    /// Look `name` up (A records) at the cluster's DNS.
    Resolve {
        name: String,
        reply: oneshot::Sender<Result<Vec<IpAddr>, String>>,
    },
    Stop,
}

/// Figures the loop publishes (the status line reads them).
#[derive(Default)]
pub struct Stats {
    /// Milliseconds since the last handshake, `u64::MAX` before the first.
    pub since_handshake_ms: AtomicU64,
    /// Bytes through the tunnel each way (WireGuard's counters).
    pub received: AtomicU64,
    pub sent: AtomicU64,
    /// Connections open now.
    pub connections: AtomicU64,
}

impl Stats {
    pub fn since_handshake(&self) -> Option<Duration> {
        match self.since_handshake_ms.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}

/// How the rest of the CLI reaches the loop.
#[derive(Clone)]
pub struct Handle {
    requests: mpsc::SyncSender<Request>,
    waker: Arc<Waker>,
    pub stats: Arc<Stats>,
}

impl Handle {
    /// Hands a request to the loop; gives it back when the loop is full or gone.
    pub fn send(&self, request: Request) -> Result<(), Request> {
        match self.requests.try_send(request) {
            Ok(()) => {
                let _ = self.waker.wake();
                Ok(())
            }
            Err(mpsc::TrySendError::Full(request) | mpsc::TrySendError::Disconnected(request)) => {
                Err(request)
            }
        }
    }

    /// Looks a name up at the cluster's DNS through the tunnel.
    pub async fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Resolve {
            name: name.to_string(),
            reply,
        })
        .map_err(|_| "the tunnel is busy or gone".to_string())?;
        answer
            .await
            .unwrap_or_else(|_| Err("the tunnel stopped".to_string()))
    }

    pub fn stop(&self) {
        let _ = self.send(Request::Stop);
    }
}

/// Starts the loop on its own thread.
pub fn start(config: Config) -> io::Result<(Handle, JoinHandle<io::Result<()>>)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (requests, inbox) = mpsc::sync_channel(REQUESTS);
    let stats = Arc::new(Stats {
        since_handshake_ms: AtomicU64::new(u64::MAX),
        ..Stats::default()
    });
    let bind: SocketAddr = if config.endpoint.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut udp = UdpSocket::bind(bind)?;
    udp.connect(config.endpoint)?;
    poll.registry()
        .register(&mut udp, TUNNEL, Interest::READABLE)?;
    let handle = Handle {
        requests,
        waker,
        stats: stats.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("gefyra-tunnel".into())
        .spawn(move || Loop::new(config, poll, udp, inbox, stats).run())?;
    Ok((handle, thread))
}

enum Phase {
    /// The stack is connecting to the target; the local side waits.
    Connecting {
        on_open: Vec<u8>,
        on_fail: Vec<u8>,
        deadline: Instant,
    },
    /// Bytes flow both ways.
    Open,
}

struct Connection {
    splice: Splice,
    phase: Phase,
    /// For an exposed connection: the cluster side's endpoint (to see its SYN again).
    exposed_from: Option<IpEndpoint>,
    /// For a connection the stack opened: its local port (free again when it ends).
    local_port: Option<u16>,
}

struct Lookup {
    query: dns::QueryHandle,
    reply: oneshot::Sender<Result<Vec<IpAddr>, String>>,
    deadline: Instant,
}

struct Loop {
    config: Config,
    poll: Poll,
    udp: UdpSocket,
    inbox: mpsc::Receiver<Request>,
    stats: Arc<Stats>,
    tunnel: Box<Tunn>,
    queues: Queues,
    stack: Interface,
    sockets: SocketSet<'static>,
    dns: SocketHandle,
    lookups: Vec<Lookup>,
    connections: HashMap<Token, Connection>,
    next_token: usize,
    ports_in_use: HashSet<u16>,
    next_port: u16,
    epoch: Instant,
    datagram: Vec<u8>,
    sealed: Vec<u8>,
    last_tick: Instant,
    /// The last initiation sent because the session had given up (at most one every
    /// `RETRY_HANDSHAKE`).
    last_retry: Option<Instant>,
    /// The last round still moved bytes: poll again at once (readiness is edge-triggered,
    /// what is left would not be announced again).
    busy: bool,
}

impl Loop {
    fn new(
        config: Config,
        poll: Poll,
        udp: UdpSocket,
        inbox: mpsc::Receiver<Request>,
        stats: Arc<Stats>,
    ) -> Self {
        let tunnel = Box::new(Tunn::new(
            StaticSecret::from(config.private_key),
            PublicKey::from(config.server_public_key),
            config.preshared_key,
            Some(PERSISTENT_KEEPALIVE),
            rand::random::<u32>() >> 8,
            None,
        ));
        let mut queues = Queues {
            inbound: Default::default(),
            outbound: Vec::new(),
            mtu: config.mtu,
        };
        let stack =
            gefyra_netstack::interface::new(&mut queues, &[IpAddr::V4(config.address)], false);
        let mut sockets = SocketSet::new(Vec::new());
        let slots: Vec<Option<dns::DnsQuery>> = (0..LOOKUPS).map(|_| None).collect();
        let dns = sockets.add(dns::Socket::new(&[IpAddress::Ipv4(config.dns)], slots));
        let now = Instant::now();
        Self {
            config,
            poll,
            udp,
            inbox,
            stats,
            tunnel,
            queues,
            stack,
            sockets,
            dns,
            lookups: Vec::new(),
            connections: HashMap::new(),
            next_token: FIRST_FLOW,
            ports_in_use: HashSet::new(),
            next_port: 49_152,
            epoch: now,
            datagram: vec![0; DATAGRAM],
            sealed: vec![0; DATAGRAM],
            last_tick: now - TICK,
            last_retry: None,
            busy: false,
        }
    }

    fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        // The first handshake at once (a WAITING client's first byte should not wait).
        self.handshake();
        loop {
            let timeout = self.timeout();
            if let Err(error) = self.poll.poll(&mut events, Some(timeout)) {
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            for event in &events {
                match event.token() {
                    TUNNEL => self.receive()?,
                    WAKER => {}
                    token => {
                        if let Some(connection) = self.connections.get_mut(&token) {
                            connection.splice.readable |=
                                event.is_readable() || event.is_read_closed() || event.is_error();
                            connection.splice.writable |=
                                event.is_writable() || event.is_write_closed() || event.is_error();
                        }
                    }
                }
            }
            if !self.take_requests() {
                self.close_all();
                return Ok(());
            }
            if self.last_tick.elapsed() >= TICK {
                self.tick();
            }
            self.pump();
            self.publish();
        }
    }

    fn timeout(&mut self) -> Duration {
        if self.busy {
            return Duration::ZERO;
        }
        let now = gefyra_netstack::interface::clock(self.epoch, Instant::now());
        let stack = self
            .stack
            .poll_delay(now, &self.sockets)
            .map(|delay| Duration::from_micros(delay.total_micros()))
            .unwrap_or(TICK);
        stack.min(TICK.saturating_sub(self.last_tick.elapsed()))
    }

    /// A handshake initiation, now (at start, and when the session gave up).
    fn handshake(&mut self) {
        if let boringtun::noise::TunnResult::WriteToNetwork(datagram) = self
            .tunnel
            .format_handshake_initiation(&mut self.sealed, true)
        {
            let _ = self.udp.send(datagram);
        }
    }

    /// Datagrams from Stowaway: replies go back, packets into the stack (an exposed
    /// port's SYN opens its local connection first).
    fn receive(&mut self) -> io::Result<()> {
        loop {
            let length = match self.udp.recv(&mut self.datagram) {
                Ok(length) => length,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                // An ICMP error for an earlier datagram (Stowaway not there yet): WireGuard
                // retries by itself.
                Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(error) => return Err(error),
            };
            let mut packets = Vec::new();
            let udp = &self.udp;
            let datagram = &self.datagram[..length];
            session::decapsulate(
                &mut self.tunnel,
                Some(self.config.endpoint.ip()),
                datagram,
                &mut self.sealed,
                |step| match step {
                    Decapsulated::Reply { datagram, .. } => {
                        let _ = udp.send(datagram);
                    }
                    Decapsulated::Packet { packet, .. } => packets.push(packet.to_vec()),
                    Decapsulated::KeepAlive | Decapsulated::Rejected => {}
                },
            );
            for packet in packets {
                self.inbound(packet);
            }
        }
    }

    fn inbound(&mut self, packet: Vec<u8>) {
        if let Inbound::Tcp {
            source,
            destination,
            opens: true,
        } = packet::classify(&packet)
            && destination.ip() == IpAddr::V4(self.config.address)
            && let Some(local) = self.config.exposes.get(&destination.port()).copied()
            && !self.exposed_from(source)
        {
            self.expose(source, destination, local);
        }
        // Anything else, and a SYN no socket listens for (the stack answers with a reset).
        self.queues.inbound.push_back(packet);
    }

    fn exposed_from(&self, source: SocketAddr) -> bool {
        let source = IpEndpoint::from(source);
        self.connections
            .values()
            .any(|connection| connection.exposed_from == Some(source))
    }

    /// A connection from the cluster to an exposed port: dial 127.0.0.1:LOCAL and let the
    /// stack accept it (the dial completes while the handshake does).
    fn expose(&mut self, source: SocketAddr, destination: SocketAddr, local: u16) {
        let exposed = self
            .connections
            .values()
            .filter(|connection| connection.exposed_from.is_some())
            .count();
        if exposed >= MAX_EXPOSED || self.connections.len() >= MAX_CONNECTIONS {
            return;
        }
        let Ok(stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, local).into()) else {
            return;
        };
        let mut socket = tcp_socket(RECEIVE_BUFFER, SEND_BUFFER, None);
        if socket.listen(IpListenEndpoint::from(destination)).is_err() {
            return;
        }
        let handle = self.sockets.add(socket);
        let phase = Phase::Connecting {
            on_open: Vec::new(),
            on_fail: Vec::new(),
            deadline: Instant::now() + CONNECT_TIMEOUT,
        };
        if let Some(token) = self.register(stream, handle, phase, None) {
            if let Some(connection) = self.connections.get_mut(&token) {
                connection.exposed_from = Some(IpEndpoint::from(source));
            }
        } else {
            self.sockets.remove(handle);
        }
    }

    fn register(
        &mut self,
        mut stream: TcpStream,
        socket: SocketHandle,
        phase: Phase,
        local_port: Option<u16>,
    ) -> Option<Token> {
        let token = Token(self.next_token);
        self.next_token = self.next_token.wrapping_add(1).max(FIRST_FLOW);
        self.poll
            .registry()
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .ok()?;
        let _ = stream.set_nodelay(true);
        self.connections.insert(
            token,
            Connection {
                splice: Splice::new(socket, stream),
                phase,
                exposed_from: None,
                local_port,
            },
        );
        Some(token)
    }

    /// Requests from the rest of the CLI; `false` to stop.
    fn take_requests(&mut self) -> bool {
        loop {
            match self.inbox.try_recv() {
                Ok(Request::Open {
                    target,
                    stream,
                    on_open,
                    on_fail,
                }) => self.open(target, stream, on_open, on_fail),
                Ok(Request::Resolve { name, reply }) => self.resolve(name, reply),
                Ok(Request::Stop) | Err(mpsc::TryRecvError::Disconnected) => return false,
                Err(mpsc::TryRecvError::Empty) => return true,
            }
        }
    }

    fn open(
        &mut self,
        target: SocketAddr,
        stream: std::net::TcpStream,
        on_open: Vec<u8>,
        on_fail: Vec<u8>,
    ) {
        let refuse = |mut stream: std::net::TcpStream, reply: &[u8]| {
            let _ = stream.write_all(reply);
            let _ = stream.shutdown(Shutdown::Both);
        };
        if self.connections.len() >= MAX_CONNECTIONS || !target.is_ipv4() {
            refuse(stream, &on_fail);
            return;
        }
        let Some(port) = self.free_port() else {
            refuse(stream, &on_fail);
            return;
        };
        let mut socket = tcp_socket(RECEIVE_BUFFER, SEND_BUFFER, None);
        let local = IpEndpoint::new(IpAddress::Ipv4(self.config.address), port);
        if socket
            .connect(self.stack.context(), IpEndpoint::from(target), local)
            .is_err()
        {
            refuse(stream, &on_fail);
            return;
        }
        if stream.set_nonblocking(true).is_err() {
            refuse(stream, &on_fail);
            return;
        }
        let handle = self.sockets.add(socket);
        let phase = Phase::Connecting {
            on_open,
            on_fail,
            deadline: Instant::now() + CONNECT_TIMEOUT,
        };
        self.ports_in_use.insert(port);
        if self
            .register(TcpStream::from_std(stream), handle, phase, Some(port))
            .is_none()
        {
            self.ports_in_use.remove(&port);
            self.sockets.remove(handle);
        }
    }

    /// A local port for a connection the stack opens (49152–65535, not in use).
    fn free_port(&mut self) -> Option<u16> {
        for _ in 0..=16_383u16 {
            let port = self.next_port;
            self.next_port = port.checked_add(1).unwrap_or(49_152);
            if !self.ports_in_use.contains(&port) {
                return Some(port);
            }
        }
        None
    }

    fn resolve(&mut self, name: String, reply: oneshot::Sender<Result<Vec<IpAddr>, String>>) {
        let socket = self.sockets.get_mut::<dns::Socket>(self.dns);
        match socket.start_query(self.stack.context(), &name, DnsQueryType::A) {
            Ok(query) => self.lookups.push(Lookup {
                query,
                reply,
                deadline: Instant::now() + RESOLVE_TIMEOUT,
            }),
            Err(error) => {
                let _ = reply.send(Err(match error {
                    dns::StartQueryError::NoFreeSlot => {
                        format!("too many lookups at once (at most {LOOKUPS})")
                    }
                    _ => format!("{name:?} is not a DNS name"),
                }));
            }
        }
    }

    fn tick(&mut self) {
        self.last_tick = Instant::now();
        match session::timers(&mut self.tunnel, &mut self.sealed) {
            Timers::Send(datagram) => {
                let _ = self.udp.send(datagram);
            }
            Timers::Expired
                if self
                    .last_retry
                    .is_none_or(|last| last.elapsed() >= RETRY_HANDSHAKE) =>
            {
                self.last_retry = Some(Instant::now());
                self.handshake();
            }
            Timers::Expired => {}
            Timers::Idle => {}
        }
    }

    /// Polls the stack and copies bytes until nothing moves (or enough rounds went), then
    /// sends what the stack wrote.
    fn pump(&mut self) {
        self.busy = false;
        for round in 0..ROUNDS {
            let now = gefyra_netstack::interface::clock(self.epoch, Instant::now());
            let polled = self.stack.poll(now, &mut self.queues, &mut self.sockets);
            let moved = self.copy();
            self.answer_lookups();
            self.flush();
            if !moved && polled == smoltcp::iface::PollResult::None {
                break;
            }
            self.busy = round + 1 == ROUNDS;
        }
        self.end_finished();
    }

    fn copy(&mut self) -> bool {
        let mut moved = false;
        for connection in self.connections.values_mut() {
            let socket = self
                .sockets
                .get_mut::<tcp::Socket>(connection.splice.socket);
            if let Phase::Connecting {
                on_open, deadline, ..
            } = &mut connection.phase
            {
                match socket.state() {
                    tcp::State::Established => {
                        // A proxy's reply: a few bytes into a fresh socket's empty buffer.
                        let reply = std::mem::take(on_open);
                        if write_all_now(&mut connection.splice.stream, &reply).is_err() {
                            socket.abort();
                        }
                        connection.phase = Phase::Open;
                        moved = true;
                    }
                    // Connecting out, or an exposed port waiting for the cluster's SYN.
                    tcp::State::SynSent | tcp::State::Listen | tcp::State::SynReceived
                        if Instant::now() < *deadline =>
                    {
                        continue;
                    }
                    _ => {
                        socket.abort();
                        continue;
                    }
                }
            }
            if socket.state() == tcp::State::Closed {
                continue;
            }
            moved |= connection.splice.pump(socket, SHARE).any();
        }
        moved
    }

    fn answer_lookups(&mut self) {
        if self.lookups.is_empty() {
            return;
        }
        let now = Instant::now();
        let socket = self.sockets.get_mut::<dns::Socket>(self.dns);
        let mut waiting = Vec::with_capacity(self.lookups.len());
        for lookup in self.lookups.drain(..) {
            match socket.get_query_result(lookup.query) {
                Ok(addresses) => {
                    let addresses = addresses
                        .iter()
                        .map(|address| match address {
                            IpAddress::Ipv4(v4) => IpAddr::V4(*v4),
                            IpAddress::Ipv6(v6) => IpAddr::V6(*v6),
                        })
                        .collect();
                    let _ = lookup.reply.send(Ok(addresses));
                }
                Err(dns::GetQueryResultError::Pending) if now < lookup.deadline => {
                    waiting.push(lookup);
                }
                Err(dns::GetQueryResultError::Pending) => {
                    socket.cancel_query(lookup.query);
                    let _ = lookup.reply.send(Err(format!(
                        "the cluster's DNS did not answer within {}s",
                        RESOLVE_TIMEOUT.as_secs()
                    )));
                }
                Err(dns::GetQueryResultError::Failed) => {
                    let _ = lookup
                        .reply
                        .send(Err("the cluster's DNS has no such name".to_string()));
                }
            }
        }
        self.lookups = waiting;
    }

    /// What the stack wrote, sealed and sent.
    fn flush(&mut self) {
        for packet in self.queues.outbound.drain(..) {
            if let Some(datagram) =
                session::encapsulate(&mut self.tunnel, &packet, &mut self.sealed)
            {
                let _ = self.udp.send(datagram);
            }
        }
    }

    /// Connections whose both sides are done, or that failed, go; a failed proxy
    /// connection gets its failure reply first.
    fn end_finished(&mut self) {
        let finished: Vec<Token> = self
            .connections
            .iter()
            .filter(|(_, connection)| {
                let state = self
                    .sockets
                    .get::<tcp::Socket>(connection.splice.socket)
                    .state();
                state == tcp::State::Closed || state == tcp::State::TimeWait
            })
            .map(|(token, _)| *token)
            .collect();
        for token in finished {
            let Some(mut connection) = self.connections.remove(&token) else {
                continue;
            };
            if let Phase::Connecting { on_fail, .. } = &connection.phase {
                let _ = write_all_now(&mut connection.splice.stream, on_fail);
            }
            let _ = self
                .poll
                .registry()
                .deregister(&mut connection.splice.stream);
            let _ = connection.splice.stream.shutdown(Shutdown::Both);
            self.sockets.remove(connection.splice.socket);
            if let Some(port) = connection.local_port {
                self.ports_in_use.remove(&port);
            }
        }
    }

    fn publish(&self) {
        let (since, sent, received, _, _) = self.tunnel.stats();
        let since = since.map_or(u64::MAX, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX - 1)
        });
        self.stats
            .since_handshake_ms
            .store(since, Ordering::Relaxed);
        self.stats.sent.store(sent as u64, Ordering::Relaxed);
        self.stats
            .received
            .store(received as u64, Ordering::Relaxed);
        self.stats
            .connections
            .store(self.connections.len() as u64, Ordering::Relaxed);
    }

    /// Stop: every connection is reset on both sides.
    fn close_all(&mut self) {
        for connection in self.connections.values_mut() {
            self.sockets
                .get_mut::<tcp::Socket>(connection.splice.socket)
                .abort();
            let _ = connection.splice.stream.shutdown(Shutdown::Both);
        }
        let now = gefyra_netstack::interface::clock(self.epoch, Instant::now());
        let _ = self.stack.poll(now, &mut self.queues, &mut self.sockets);
        self.flush();
        self.connections.clear();
    }
}

/// Writes a few bytes to a non-blocking socket, waiting briefly if its buffer is full.
fn write_all_now(stream: &mut TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1);
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => bytes = &bytes[written..],
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loop that is never run: its socket points nowhere, its requests come from here.
    fn idle_loop(exposes: &[(u16, u16)]) -> Loop {
        let poll = Poll::new().unwrap();
        let mut udp = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        udp.connect("127.0.0.1:9".parse().unwrap()).unwrap();
        poll.registry()
            .register(&mut udp, TUNNEL, Interest::READABLE)
            .unwrap();
        let (_, inbox) = mpsc::sync_channel(1);
        let config = Config {
            private_key: [1; 32],
            server_public_key: *PublicKey::from(&StaticSecret::from([2; 32])).as_bytes(),
            preshared_key: None,
            endpoint: "127.0.0.1:9".parse().unwrap(),
            address: Ipv4Addr::new(192, 168, 99, 2),
            dns: Ipv4Addr::new(192, 168, 99, 1),
            mtu: 1420,
            exposes: exposes.iter().copied().collect(),
        };
        Loop::new(config, poll, udp, inbox, Arc::new(Stats::default()))
    }

    /// A TCP packet from `source` to the tunnel address on `port`, as Stowaway forwards one.
    fn tcp(source: SocketAddr, port: u16, syn: bool, ack: bool) -> Vec<u8> {
        use smoltcp::phy::ChecksumCapabilities;
        use smoltcp::wire::{
            IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
        };
        let IpAddr::V4(from) = source.ip() else {
            unreachable!()
        };
        let repr = TcpRepr {
            src_port: source.port(),
            dst_port: port,
            control: if syn {
                TcpControl::Syn
            } else {
                TcpControl::None
            },
            seq_number: TcpSeqNumber(1),
            ack_number: ack.then_some(TcpSeqNumber(1)),
            window_len: 1024,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let ip = Ipv4Repr {
            src_addr: from,
            dst_addr: Ipv4Addr::new(192, 168, 99, 2),
            next_header: IpProtocol::Tcp,
            payload_len: repr.header_len(),
            hop_limit: 64,
        };
        let mut bytes = vec![0u8; ip.buffer_len() + repr.header_len()];
        let mut packet = Ipv4Packet::new_unchecked(&mut bytes);
        ip.emit(&mut packet, &ChecksumCapabilities::default());
        repr.emit(
            &mut TcpPacket::new_unchecked(packet.payload_mut()),
            &IpAddress::Ipv4(from),
            &IpAddress::Ipv4(Ipv4Addr::new(192, 168, 99, 2)),
            &ChecksumCapabilities::default(),
        );
        bytes
    }

    #[test]
    fn the_cluster_side_holds_at_most_its_bound_of_exposed_connections() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = server.local_addr().unwrap().port();
        let mut engine = idle_loop(&[(8080, local)]);
        // A flood of SYNs from as many source ports: each would cost a local connection.
        for port in 1..=1_000u16 {
            let source = SocketAddr::from(([10, 0, 0, 7], port));
            engine.inbound(tcp(source, 8080, true, false));
        }
        assert_eq!(engine.connections.len(), MAX_EXPOSED);
        // The same SYN again (a retransmission) opens nothing more.
        engine.connections.clear();
        let source = SocketAddr::from(([10, 0, 0, 7], 40_000));
        engine.inbound(tcp(source, 8080, true, false));
        engine.inbound(tcp(source, 8080, true, false));
        assert_eq!(engine.connections.len(), 1);
    }

    #[test]
    fn only_syns_to_an_exposed_port_of_the_tunnel_address_dial_this_machine() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = server.local_addr().unwrap().port();
        let mut engine = idle_loop(&[(8080, local)]);
        let source = SocketAddr::from(([10, 0, 0, 7], 5_000));
        // Another port, a non-SYN, garbage, a truncated header: nothing dialled, no panic.
        engine.inbound(tcp(source, 8081, true, false));
        engine.inbound(tcp(source, 8080, false, true));
        engine.inbound(vec![0x45; 7]);
        engine.inbound(Vec::new());
        let mut truncated = tcp(source, 8080, true, false);
        truncated.truncate(30);
        engine.inbound(truncated);
        assert!(engine.connections.is_empty());
        // Whatever arrived went to the stack, which drops or resets it.
        assert!(!engine.queues.inbound.is_empty());
    }
}
