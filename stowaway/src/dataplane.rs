//! The data plane: one thread, one event loop (mio) over the WireGuard socket and every
//! forwarded flow. Peers' TCP is terminated by a userspace stack (smoltcp) and
//! re-originated as an ordinary socket; UDP is relayed datagram by datagram; nothing needs
//! a TUN device or a capability.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gefyra_api::ipam::SERVER_ADDRESS;
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use smoltcp::iface::{Config as StackConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};

use crate::endpoint::{Drop, Endpoint, PeerStats};
use crate::metrics::Metrics;
use crate::packet::{self, Inbound};
use crate::peers::{self, Key, PeerSpec};

/// The server's IPv6 address inside the userspace stack (never on a wire: it only lets the
/// stack accept IPv6 flows).
const SERVER_ADDRESS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
/// Per-flow receive buffer of the userspace TCP stack (peer to cluster): the window the
/// peer may fill.
const TCP_RECEIVE_BUFFER: usize = 1 << 20;
/// Per-flow send buffer (cluster to peer): bounds the data in flight to the peer. The stack
/// does not pace and retransmits after at least 1 s, so every burst lost on the way costs
/// a second. Measured with iperf3 (`make bench`): 512 KiB gave 0.03–0.10 Gbit/s towards the
/// peer, 128 KiB 0.07–0.28, 64 KiB 0.43–0.54 (at or above the kernel baseline).
const TCP_SEND_BUFFER: usize = 64 << 10;
const WIREGUARD: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_LISTENER: usize = 2;
const FIRST_FLOW: usize = 1 << 16;
/// The largest UDP datagram.
const DATAGRAM: usize = 65_536;
/// Rounds of stack polling and copying in one turn of the event loop.
const PUMP_ROUNDS: usize = 64;
/// Datagrams waiting for room in the WireGuard socket's send buffer (beyond: dropped).
const OUTBOX: usize = 8_192;

/// A TCP port on the cluster side whose connections go through the tunnel to `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub listen: SocketAddr,
    pub target: SocketAddr,
}

impl std::str::FromStr for Forward {
    type Err = String;

    /// `PORT=ADDR:PORT` (listens on every address) or `LISTEN_ADDR:PORT=ADDR:PORT`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (listen, target) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?} is not PORT=ADDRESS:PORT"))?;
        let listen = match listen.parse::<u16>() {
            Ok(port) => SocketAddr::from(([0, 0, 0, 0], port)),
            Err(_) => listen
                .parse()
                .map_err(|_| format!("{listen:?} is neither a port nor ADDRESS:PORT"))?,
        };
        let target: SocketAddr = target
            .parse()
            .map_err(|_| format!("{target:?} is not ADDRESS:PORT"))?;
        if target.is_ipv6() {
            return Err(format!(
                "{target}: forwards to IPv6 addresses are not supported yet"
            ));
        }
        Ok(Self { listen, target })
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The WireGuard socket (UDP 31820 by default).
    pub listen: SocketAddr,
    /// Where DNS queries to 192.168.99.1 are relayed.
    pub resolver: SocketAddr,
    pub forwards: Vec<Forward>,
    /// The tunnel MTU (the largest IP packet a peer sends or receives).
    pub mtu: usize,
    pub udp_idle: Duration,
    pub dial_timeout: Duration,
    /// Handshakes per second (all peers) before cookies are required.
    pub handshakes_per_second: u64,
}

/// What the control plane tells the data plane.
pub enum Command {
    Peers(BTreeMap<Key, PeerSpec>),
    Stop,
}

/// What the data plane publishes for the control plane (status write-back, metrics, probes).
#[derive(Default)]
pub struct Shared {
    pub stats: Mutex<BTreeMap<String, PeerStats>>,
    /// Unix seconds of the loop's last tick (liveness).
    pub heartbeat: AtomicU64,
}

/// The control plane's side: send commands, wake the loop.
#[derive(Clone)]
pub struct Handle {
    commands: mpsc::Sender<Command>,
    waker: Arc<Waker>,
}

impl Handle {
    pub fn set_peers(&self, peers: BTreeMap<Key, PeerSpec>) {
        self.send(Command::Peers(peers));
    }

    pub fn stop(&self) {
        self.send(Command::Stop);
    }

    fn send(&self, command: Command) {
        // A stopped data plane has nothing left to tell.
        if self.commands.send(command).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

/// IP packets between the stack and the tunnels.
struct Queues {
    inbound: VecDeque<Vec<u8>>,
    outbound: Vec<Vec<u8>>,
    mtu: usize,
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut Vec<Vec<u8>>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0u8; len];
        let result = f(&mut packet);
        self.0.push(packet);
        result
    }
}

impl phy::Device for Queues {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.inbound.pop_front()?;
        Some((RxToken(packet), TxToken(&mut self.outbound)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(TxToken(&mut self.outbound))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut capabilities = DeviceCapabilities::default();
        capabilities.medium = Medium::Ip;
        capabilities.max_transmission_unit = self.mtu;
        // WireGuard authenticates every packet: checksums are only written, never checked.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        checksum.udp = Checksum::Tx;
        checksum.icmpv4 = Checksum::Tx;
        checksum.icmpv6 = Checksum::Tx;
        capabilities.checksum = checksum;
        capabilities
    }
}

/// A peer's connection awaiting its cluster-side dial; the peer's SYN is held meanwhile.
struct Dial {
    stream: TcpStream,
    syn: Vec<u8>,
    tuple: (SocketAddr, SocketAddr),
    started: Instant,
}

/// A TCP flow: a stack socket on the tunnel side, an ordinary socket on the cluster side.
struct TcpFlow {
    socket: SocketHandle,
    stream: TcpStream,
    /// (peer side, cluster side) as the peer sees it; `None` for reverse forwards.
    tuple: Option<(SocketAddr, SocketAddr)>,
    /// Edge-triggered readiness not yet used up.
    readable: bool,
    writable: bool,
    /// The cluster side finished sending (FIN queued towards the peer).
    cluster_done: bool,
    /// The peer finished sending and it was passed on (cluster side shut down for writing).
    peer_done: bool,
}

struct UdpFlow {
    socket: UdpSocket,
    /// The peer's address and the destination it sent to (replies come from there).
    peer: SocketAddr,
    destination: SocketAddr,
    last_used: Instant,
}

pub struct DataPlane {
    config: Config,
    poll: Poll,
    wireguard: UdpSocket,
    commands: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    endpoint: Endpoint,
    stack: Interface,
    queues: Queues,
    sockets: SocketSet<'static>,
    listeners: Vec<(TcpListener, Forward)>,
    dials: HashMap<Token, Dial>,
    tcp: HashMap<Token, TcpFlow>,
    udp: HashMap<Token, UdpFlow>,
    tcp_tuples: HashMap<(SocketAddr, SocketAddr), Token>,
    udp_tuples: HashMap<(SocketAddr, SocketAddr), Token>,
    next_token: usize,
    next_port: u16,
    started: Instant,
    buffer: Vec<u8>,
    /// Datagrams the WireGuard socket could not take yet (sent when it is writable again,
    /// so that a burst from the stack is delayed rather than lost).
    outbox: VecDeque<(SocketAddr, Vec<u8>)>,
    /// The last pump stopped at its bound with work left: do not sleep.
    unfinished: bool,
}

impl DataPlane {
    /// Binds every socket (so a taken port fails here, before anything runs).
    pub fn bind(
        config: Config,
        private_key: Key,
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
    ) -> io::Result<(Self, Handle)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut wireguard = UdpSocket::bind(config.listen).map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("binding the WireGuard socket {}: {error}", config.listen),
            )
        })?;
        poll.registry().register(
            &mut wireguard,
            WIREGUARD,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let mut listeners = Vec::new();
        for (index, forward) in config.forwards.iter().enumerate() {
            let mut listener = TcpListener::bind(forward.listen).map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("binding the forward listener {}: {error}", forward.listen),
                )
            })?;
            poll.registry().register(
                &mut listener,
                Token(FIRST_LISTENER + index),
                Interest::READABLE,
            )?;
            listeners.push((listener, *forward));
        }
        let mut queues = Queues {
            inbound: VecDeque::new(),
            outbound: Vec::new(),
            mtu: config.mtu,
        };
        let started = Instant::now();
        let mut stack = Interface::new(
            StackConfig::new(HardwareAddress::Ip),
            &mut queues,
            smoltcp::time::Instant::ZERO,
        );
        // Accept every destination: the stack stands in for the whole cluster.
        stack.set_any_ip(true);
        stack.update_ip_addrs(|addresses| {
            let server = match SERVER_ADDRESS {
                IpAddr::V4(v4) => IpCidr::new(IpAddress::Ipv4(v4), 32),
                IpAddr::V6(v6) => IpCidr::new(IpAddress::Ipv6(v6), 128),
            };
            addresses.push(server).expect("room for two addresses");
            addresses
                .push(IpCidr::new(IpAddress::Ipv6(SERVER_ADDRESS_V6), 128))
                .expect("room for two addresses");
        });
        if let IpAddr::V4(v4) = SERVER_ADDRESS {
            stack
                .routes_mut()
                .add_default_ipv4_route(v4)
                .expect("room for a route");
        }
        stack
            .routes_mut()
            .add_default_ipv6_route(SERVER_ADDRESS_V6)
            .expect("room for a route");
        let (sender, commands) = mpsc::channel();
        let endpoint = Endpoint::with_handshake_rate(private_key, config.handshakes_per_second);
        let plane = Self {
            config,
            poll,
            wireguard,
            commands,
            shared,
            metrics,
            endpoint,
            stack,
            queues,
            sockets: SocketSet::new(Vec::new()),
            listeners,
            dials: HashMap::new(),
            tcp: HashMap::new(),
            udp: HashMap::new(),
            tcp_tuples: HashMap::new(),
            udp_tuples: HashMap::new(),
            next_token: FIRST_FLOW,
            next_port: 49_152,
            started,
            buffer: vec![0; DATAGRAM],
            outbox: VecDeque::new(),
            unfinished: false,
        };
        let handle = Handle {
            commands: sender,
            waker,
        };
        Ok((plane, handle))
    }

    /// The WireGuard socket's address (the port, when bound to port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.wireguard.local_addr()
    }

    /// Runs until `Handle::stop` (or the handle is dropped).
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut next_tick = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_tick {
                self.tick(now);
                next_tick = now + Duration::from_secs(1);
            }
            let stack_delay = self
                .stack
                .poll_delay(self.stack_now(), &self.sockets)
                .map(|delay| Duration::from_micros(delay.total_micros()));
            let timeout = if self.unfinished {
                Duration::ZERO
            } else {
                stack_delay
                    .unwrap_or(Duration::MAX)
                    .min(next_tick.saturating_duration_since(now))
            };
            if let Err(error) = self.poll.poll(&mut events, Some(timeout)) {
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            // Not only on writable edges: whatever waits is sent as soon as there is room.
            if !self.outbox.is_empty() {
                self.flush_outbox();
            }
            for event in events.iter() {
                match event.token() {
                    WIREGUARD => {
                        if event.is_writable() {
                            self.flush_outbox();
                        }
                        if event.is_readable() {
                            self.receive_datagrams();
                        }
                    }
                    WAKER => {
                        if !self.take_commands() {
                            return Ok(());
                        }
                    }
                    Token(index) if index < FIRST_FLOW => self.accept(index - FIRST_LISTENER),
                    token => self.flow_event(token, event.is_readable(), event.is_writable()),
                }
            }
            self.pump();
        }
    }

    fn stack_now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.started.elapsed().as_micros() as i64)
    }

    /// Applies the control plane's commands; `false` to stop.
    fn take_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Peers(desired)) => self.set_peers(&desired),
                Ok(Command::Stop) | Err(mpsc::TryRecvError::Disconnected) => return false,
                Err(mpsc::TryRecvError::Empty) => return true,
            }
        }
    }

    fn set_peers(&mut self, desired: &BTreeMap<Key, PeerSpec>) {
        let plan = peers::plan(&self.endpoint.specs(), desired);
        if plan.add.is_empty() && plan.replace.is_empty() && plan.remove.is_empty() {
            return;
        }
        tracing::info!(
            added = plan.add.len(),
            replaced = plan.replace.len(),
            removed = plan.remove.len(),
            peers = desired.len(),
            "peer table changed"
        );
        self.endpoint.apply(plan);
        self.metrics.peers.set(desired.len() as i64);
        // Flows of peers that are gone end now.
        for flow in self.tcp.values_mut() {
            if let Some((peer, _)) = flow.tuple
                && !self.endpoint.holds(peer.ip())
            {
                self.sockets.get_mut::<tcp::Socket>(flow.socket).abort();
            }
        }
        let gone: Vec<Token> = self
            .udp
            .iter()
            .filter(|(_, flow)| !self.endpoint.holds(flow.peer.ip()))
            .map(|(token, _)| *token)
            .collect();
        for token in gone {
            self.close_udp(token);
        }
    }

    fn tick(&mut self, now: Instant) {
        for (to, datagram) in self.endpoint.tick() {
            self.send_datagram(to, datagram);
        }
        let idle = self.config.udp_idle;
        let expired: Vec<Token> = self
            .udp
            .iter()
            .filter(|(_, flow)| now.duration_since(flow.last_used) >= idle)
            .map(|(token, _)| *token)
            .collect();
        for token in expired {
            self.close_udp(token);
        }
        let timeout = self.config.dial_timeout;
        let late: Vec<Token> = self
            .dials
            .iter()
            .filter(|(_, dial)| now.duration_since(dial.started) >= timeout)
            .map(|(token, _)| *token)
            .collect();
        for token in late {
            self.dial_failed(token, "timed out");
        }
        *self.shared.stats.lock().expect("stats lock") = self.endpoint.peer_stats();
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.shared.heartbeat.store(unix, Ordering::Relaxed);
        self.pump();
    }

    fn token(&mut self) -> Token {
        let token = Token(self.next_token);
        self.next_token = self.next_token.checked_add(1).unwrap_or(FIRST_FLOW);
        token
    }

    fn send_datagram(&mut self, to: SocketAddr, datagram: Vec<u8>) {
        if self.outbox.is_empty() {
            match self.wireguard.send_to(&datagram, to) {
                Ok(_) => return,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => {
                    tracing::debug!(%to, %error, "sending a WireGuard datagram failed");
                    return;
                }
            }
        }
        if self.outbox.len() < OUTBOX {
            if self.outbox.is_empty() {
                tracing::debug!("the WireGuard socket's send buffer is full; queueing");
            }
            self.outbox.push_back((to, datagram));
        } else {
            self.metrics
                .dropped
                .with_label_values(&["send_buffer_full"])
                .inc();
        }
    }

    fn flush_outbox(&mut self) {
        while let Some((to, datagram)) = self.outbox.front() {
            match self.wireguard.send_to(datagram, *to) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) => tracing::debug!(%to, %error, "sending a WireGuard datagram failed"),
                Ok(_) => {}
            }
            self.outbox.pop_front();
        }
    }

    fn receive_datagrams(&mut self) {
        let mut datagram = std::mem::take(&mut self.buffer);
        loop {
            let (length, from) = match self.wireguard.recv_from(&mut datagram) {
                Ok(received) => received,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => {
                    tracing::warn!(%error, "receiving on the WireGuard socket failed");
                    break;
                }
            };
            let is_initiation = datagram.first() == Some(&1) && length == 148;
            let handled = self.endpoint.handle_datagram(from, &datagram[..length]);
            if is_initiation {
                let result = match (&handled.handshake_with, handled.dropped) {
                    (Some(_), _) => "completed",
                    (None, Some(Drop::UnknownPeer)) => "unknown_peer",
                    (None, Some(_)) => "rejected",
                    (None, None) if !handled.replies.is_empty() => "cookie_required",
                    (None, None) => "rejected",
                };
                self.metrics.handshakes.with_label_values(&[result]).inc();
            }
            if let Some(drop) = handled.dropped {
                self.metrics
                    .dropped
                    .with_label_values(&[drop.as_str()])
                    .inc();
            }
            if let Some(client) = &handled.handshake_with {
                tracing::debug!(client, %from, "handshake completed");
            }
            for reply in handled.replies {
                self.send_datagram(from, reply);
            }
            for (_, packet) in handled.packets {
                self.route_inbound(packet);
            }
        }
        self.buffer = datagram;
    }

    /// A decrypted packet from a peer (its source already checked against its ranges).
    fn route_inbound(&mut self, packet: Vec<u8>) {
        match packet::classify(&packet) {
            Inbound::Echo { reply } => self.send_to_peer(&reply),
            Inbound::Udp {
                source,
                destination,
                payload,
            } => {
                let payload = payload.to_vec();
                self.relay_udp(source, destination, &payload);
            }
            Inbound::Tcp {
                source,
                destination,
                opens,
            } => {
                let tuple = (source, destination);
                if opens && !self.tcp_tuples.contains_key(&tuple) {
                    self.dial(tuple, packet);
                } else if self
                    .tcp_tuples
                    .get(&tuple)
                    .is_some_and(|token| self.dials.contains_key(token))
                {
                    // A retransmitted SYN while the dial is under way: the held one stands.
                } else {
                    self.queues.inbound.push_back(packet);
                }
            }
            Inbound::Unsupported => {
                self.metrics
                    .dropped
                    .with_label_values(&["unsupported"])
                    .inc();
            }
        }
    }

    /// Encrypts a packet for the peer that holds its destination and sends it.
    fn send_to_peer(&mut self, packet: &[u8]) {
        let Some(destination) = packet::destination(packet) else {
            return;
        };
        match self.endpoint.encapsulate(destination, packet) {
            Some((to, datagram)) => self.send_datagram(to, datagram),
            None => {
                tracing::debug!(%destination, "no peer holds the destination");
                self.metrics.dropped.with_label_values(&["no_route"]).inc();
            }
        }
    }

    /// Where a connection or datagram to `destination` really goes: 192.168.99.1:53 is the
    /// resolver; other ports of the server address go nowhere.
    fn target_of(&self, destination: SocketAddr) -> Option<SocketAddr> {
        if destination.ip() == SERVER_ADDRESS || destination.ip() == IpAddr::V6(SERVER_ADDRESS_V6) {
            return (destination.port() == 53).then_some(self.config.resolver);
        }
        Some(destination)
    }

    fn dial(&mut self, tuple: (SocketAddr, SocketAddr), syn: Vec<u8>) {
        let connected = self
            .target_of(tuple.1)
            .ok_or_else(|| io::Error::other("no service on the server address"))
            .and_then(TcpStream::connect);
        let mut stream = match connected {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(peer = %tuple.0, destination = %tuple.1, %error, "dial failed");
                self.refuse(syn);
                return;
            }
        };
        let token = self.token();
        if let Err(error) = self.poll.registry().register(
            &mut stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(%error, "registering a dial failed");
            self.refuse(syn);
            return;
        }
        self.tcp_tuples.insert(tuple, token);
        self.dials.insert(
            token,
            Dial {
                stream,
                syn,
                tuple,
                started: Instant::now(),
            },
        );
    }

    /// Hands the SYN to the stack with no socket to take it: the stack answers with a reset.
    fn refuse(&mut self, syn: Vec<u8>) {
        self.metrics
            .flows_total
            .with_label_values(&["tcp", "refused"])
            .inc();
        self.queues.inbound.push_back(syn);
    }

    fn dial_failed(&mut self, token: Token, why: &str) {
        if let Some(mut dial) = self.dials.remove(&token) {
            tracing::debug!(peer = %dial.tuple.0, destination = %dial.tuple.1, why, "dial failed");
            let _ = self.poll.registry().deregister(&mut dial.stream);
            self.tcp_tuples.remove(&dial.tuple);
            self.refuse(dial.syn);
        }
    }

    fn dial_event(&mut self, token: Token) {
        let Some(dial) = self.dials.get(&token) else {
            return;
        };
        match (dial.stream.take_error(), dial.stream.peer_addr()) {
            (Ok(Some(error)), _) | (Err(error), _) => {
                self.dial_failed(token, &error.to_string());
                return;
            }
            (Ok(None), Err(error)) if error.kind() == io::ErrorKind::NotConnected => return,
            (Ok(None), Err(error)) => {
                self.dial_failed(token, &error.to_string());
                return;
            }
            (Ok(None), Ok(_)) => {}
        }
        let dial = self.dials.remove(&token).expect("looked up above");
        let _ = dial.stream.set_nodelay(true);
        let mut socket = self.new_socket();
        if socket.listen(IpListenEndpoint::from(dial.tuple.1)).is_err() {
            self.tcp_tuples.remove(&dial.tuple);
            self.refuse(dial.syn);
            return;
        }
        let handle = self.sockets.add(socket);
        self.queues.inbound.push_back(dial.syn);
        self.open_flow(token, handle, dial.stream, Some(dial.tuple));
    }

    fn new_socket(&self) -> tcp::Socket<'static> {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_RECEIVE_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_SEND_BUFFER]),
        );
        socket.set_nagle_enabled(false);
        socket.set_congestion_control(tcp::CongestionControl::Cubic);
        socket.set_ack_delay(None);
        socket.set_keep_alive(Some(smoltcp::time::Duration::from_secs(30)));
        socket
    }

    fn open_flow(
        &mut self,
        token: Token,
        socket: SocketHandle,
        stream: TcpStream,
        tuple: Option<(SocketAddr, SocketAddr)>,
    ) {
        tracing::debug!(?tuple, "TCP flow opened");
        self.metrics
            .flows_total
            .with_label_values(&["tcp", "opened"])
            .inc();
        self.metrics.flows.with_label_values(&["tcp"]).inc();
        self.tcp.insert(
            token,
            TcpFlow {
                socket,
                stream,
                tuple,
                readable: true,
                writable: true,
                cluster_done: false,
                peer_done: false,
            },
        );
    }

    /// A connection on a forward listener: through the tunnel to the forward's target.
    fn accept(&mut self, listener: usize) {
        loop {
            let Some((listener, forward)) = self.listeners.get(listener) else {
                return;
            };
            let target = forward.target;
            let (mut stream, from) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) => {
                    tracing::warn!(%error, "accepting on a forward listener failed");
                    return;
                }
            };
            if !self.endpoint.holds(target.ip()) {
                tracing::info!(%from, %target, "forward refused: no connected client holds the target");
                self.metrics
                    .flows_total
                    .with_label_values(&["tcp", "refused"])
                    .inc();
                let _ = stream.shutdown(Shutdown::Both);
                continue;
            }
            let local = IpEndpoint::new(IpAddress::from(SERVER_ADDRESS), self.ephemeral_port());
            let mut socket = self.new_socket();
            if let Err(error) =
                socket.connect(self.stack.context(), IpEndpoint::from(target), local)
            {
                tracing::warn!(%target, ?error, "forward connect failed");
                continue;
            }
            let handle = self.sockets.add(socket);
            let token = self.token();
            if self
                .poll
                .registry()
                .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                .is_err()
            {
                self.sockets.remove(handle);
                continue;
            }
            let _ = stream.set_nodelay(true);
            self.open_flow(token, handle, stream, None);
        }
    }

    fn ephemeral_port(&mut self) -> u16 {
        let port = self.next_port;
        self.next_port = if port == u16::MAX { 49_152 } else { port + 1 };
        port
    }

    fn flow_event(&mut self, token: Token, readable: bool, writable: bool) {
        if self.dials.contains_key(&token) {
            self.dial_event(token);
        } else if let Some(flow) = self.tcp.get_mut(&token) {
            flow.readable |= readable;
            flow.writable |= writable;
        } else if readable {
            self.udp_readable(token);
        }
    }

    fn relay_udp(&mut self, peer: SocketAddr, destination: SocketAddr, payload: &[u8]) {
        let tuple = (peer, destination);
        let token = match self.udp_tuples.get(&tuple) {
            Some(token) => *token,
            None => match self.open_udp(tuple) {
                Some(token) => token,
                None => return,
            },
        };
        let flow = self.udp.get_mut(&token).expect("tuples and flows agree");
        flow.last_used = Instant::now();
        if let Err(error) = flow.socket.send(payload) {
            tracing::debug!(%destination, %error, "relaying a UDP datagram failed");
        }
    }

    fn open_udp(&mut self, tuple: (SocketAddr, SocketAddr)) -> Option<Token> {
        let Some(target) = self.target_of(tuple.1) else {
            self.metrics
                .dropped
                .with_label_values(&["no_service"])
                .inc();
            return None;
        };
        let local: SocketAddr = match target {
            SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let opened = UdpSocket::bind(local).and_then(|socket| {
            socket.connect(target)?;
            Ok(socket)
        });
        let mut socket = match opened {
            Ok(socket) => socket,
            Err(error) => {
                tracing::debug!(%target, %error, "opening a UDP flow failed");
                return None;
            }
        };
        let token = self.token();
        self.poll
            .registry()
            .register(&mut socket, token, Interest::READABLE)
            .ok()?;
        self.metrics
            .flows_total
            .with_label_values(&["udp", "opened"])
            .inc();
        self.metrics.flows.with_label_values(&["udp"]).inc();
        self.udp_tuples.insert(tuple, token);
        self.udp.insert(
            token,
            UdpFlow {
                socket,
                peer: tuple.0,
                destination: tuple.1,
                last_used: Instant::now(),
            },
        );
        Some(token)
    }

    fn udp_readable(&mut self, token: Token) {
        let mut buffer = std::mem::take(&mut self.buffer);
        while let Some(flow) = self.udp.get_mut(&token) {
            let length = match flow.socket.recv(&mut buffer) {
                Ok(length) => length,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                // e.g. ICMP port unreachable from the destination.
                Err(_) => continue,
            };
            flow.last_used = Instant::now();
            let (from, to) = (flow.destination, flow.peer);
            if let Some(packet) = packet::udp_packet(from, to, &buffer[..length]) {
                self.send_to_peer(&packet);
            }
        }
        self.buffer = buffer;
    }

    fn close_udp(&mut self, token: Token) {
        if let Some(mut flow) = self.udp.remove(&token) {
            let _ = self.poll.registry().deregister(&mut flow.socket);
            self.udp_tuples.remove(&(flow.peer, flow.destination));
            self.metrics.flows.with_label_values(&["udp"]).dec();
        }
    }

    /// Moves packets through the stack and bytes between the stack and the cluster sockets
    /// until nothing moves; then sends what the stack wrote.
    fn pump(&mut self) {
        // Bounded, so that the event loop always comes back to the sockets; what is left
        // is picked up on the next turn.
        self.unfinished = true;
        for _ in 0..PUMP_ROUNDS {
            let now = self.stack_now();
            self.stack.poll(now, &mut self.queues, &mut self.sockets);
            let moved = self.shuttle();
            self.stack.poll(now, &mut self.queues, &mut self.sockets);
            let outbound = std::mem::take(&mut self.queues.outbound);
            for packet in &outbound {
                self.send_to_peer(packet);
            }
            if !moved && self.queues.inbound.is_empty() {
                self.unfinished = false;
                break;
            }
        }
        self.remove_finished();
    }

    /// Copies bytes between every flow's two sides; whether any byte moved.
    fn shuttle(&mut self) -> bool {
        let mut moved = false;
        for flow in self.tcp.values_mut() {
            let socket = self.sockets.get_mut::<tcp::Socket>(flow.socket);
            // A reset or aborted connection keeps what it had received; it goes nowhere now.
            if socket.state() == tcp::State::Closed {
                continue;
            }
            moved |= peer_to_cluster(flow, socket);
            moved |= cluster_to_peer(flow, socket);
        }
        moved
    }

    fn remove_finished(&mut self) {
        let finished: Vec<Token> = self
            .tcp
            .iter()
            .filter(|(_, flow)| {
                let state = self.sockets.get::<tcp::Socket>(flow.socket).state();
                state == tcp::State::Closed || state == tcp::State::TimeWait
            })
            .map(|(token, _)| *token)
            .collect();
        for token in finished {
            let Some(mut flow) = self.tcp.remove(&token) else {
                continue;
            };
            tracing::debug!(
                tuple = ?flow.tuple,
                state = %self.sockets.get::<tcp::Socket>(flow.socket).state(),
                peer_done = flow.peer_done,
                cluster_done = flow.cluster_done,
                "TCP flow ended"
            );
            let _ = self.poll.registry().deregister(&mut flow.stream);
            // Whatever the peer had not finished is cut on the cluster side too.
            let _ = flow.stream.shutdown(Shutdown::Both);
            self.sockets.remove(flow.socket);
            if let Some(tuple) = flow.tuple {
                self.tcp_tuples.remove(&tuple);
            }
            self.metrics.flows.with_label_values(&["tcp"]).dec();
        }
    }
}

/// Bytes the peer sent, on to the cluster side; its FIN becomes a write shutdown.
fn peer_to_cluster(flow: &mut TcpFlow, socket: &mut tcp::Socket) -> bool {
    let mut moved = false;
    while flow.writable && socket.can_recv() {
        let stream = &mut flow.stream;
        match socket.recv(|bytes| match stream.write(bytes) {
            Ok(written) => (written, Ok(written)),
            Err(error) => (0, Err(error)),
        }) {
            Ok(Ok(0)) => break,
            Ok(Ok(_)) => moved = true,
            Ok(Err(error)) if error.kind() == io::ErrorKind::WouldBlock => {
                flow.writable = false;
            }
            Ok(Err(error)) if error.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => {
                socket.abort();
                return true;
            }
            Err(_) => break,
        }
    }
    if !flow.peer_done && matches!(socket.recv(|_| (0, ())), Err(tcp::RecvError::Finished)) {
        flow.peer_done = true;
        let _ = flow.stream.shutdown(Shutdown::Write);
        moved = true;
    }
    moved
}

/// Bytes the cluster side sent, on to the peer; its end becomes a FIN.
fn cluster_to_peer(flow: &mut TcpFlow, socket: &mut tcp::Socket) -> bool {
    let mut moved = false;
    while flow.readable && !flow.cluster_done && socket.can_send() {
        let stream = &mut flow.stream;
        match socket.send(|room| match stream.read(room) {
            Ok(read) => (read, Ok(read)),
            Err(error) => (0, Err(error)),
        }) {
            Ok(Ok(0)) => {
                flow.cluster_done = true;
                socket.close();
                moved = true;
            }
            Ok(Ok(_)) => moved = true,
            Ok(Err(error)) if error.kind() == io::ErrorKind::WouldBlock => {
                flow.readable = false;
            }
            Ok(Err(error)) if error.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => {
                socket.abort();
                return true;
            }
            Err(_) => break,
        }
    }
    moved
}
