//! The data plane: one or more workers, each a thread with one event loop (mio) over its
//! WireGuard socket and its peers' forwarded flows. Peers' TCP is terminated by a
//! userspace stack (smoltcp) and re-originated as an ordinary socket; UDP is relayed
//! datagram by datagram; nothing needs a TUN device or a capability.
//!
//! Peers are sharded across workers (`crate::shard`): a peer's session, flows and forwards
//! live on one worker, whose socket the kernel steers the peer's datagrams to; what lands
//! on another worker (an initiation, a forward's connection) is handed over through a
//! bounded queue. The flow limits (`policy::Ledger`) and the handshake rate are shared.
//!
//! What the userspace client shares with Stowaway (the stack's in-memory device, TCP
//! splices, packets, WireGuard sessions) lives in `gefyra_netstack`. By concept: `tunnel` (the WireGuard socket, its
//! outbox, packets to and from peers), `tcp` (dials and flows), `udp` (the relay),
//! `forward` (cluster-side listeners into the tunnel, and the bridges' connections handed
//! in through `Handle::hand_in`), `flows` (the flow table: whose each
//! flow is, what it holds, which end when the peer table changes). What a peer may reach
//! and hold is decided by `crate::policy`.

mod flows;
mod forward;
mod inbox;
mod outbox;
mod reader;
mod tcp;
mod tunnel;
mod udp;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gefyra_api::ipam::SERVER_ADDRESS;
use mio::net::{TcpListener, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use smoltcp::iface::{Interface, SocketSet};

pub use forward::{Bridged, Forward};
pub use tcp::TCP_FLOW_BUFFERS;

use crate::endpoint::{Endpoint, PeerStats};
use crate::metrics::Metrics;
use crate::peers::{Key, PeerSpec};
use crate::policy::{EgressPolicy, GlobalLimits, Holding, Ledger, PeerLimits};
use crate::shard::{self, Shard};
use flows::{FlowTable, Lookup, PeerId, Tuple};
use gefyra_netstack::device::Queues;

/// The server's IPv6 address inside the userspace stack (never on a wire: it only lets the
/// stack accept IPv6 flows).
const SERVER_ADDRESS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
const WIREGUARD: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_LISTENER: usize = 2;
const FIRST_FLOW: usize = 1 << 16;
/// The largest UDP datagram.
const DATAGRAM: usize = 65_536;
/// Rounds of stack polling and copying in one turn of the event loop.
const PUMP_ROUNDS: usize = 64;

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
    /// A TCP flow whose peer sent nothing this long (not even the answer to a keep-alive)
    /// is aborted.
    pub tcp_idle: Duration,
    /// A TCP flow that carried no payload either way this long (its peer answering
    /// keep-alives all the while) is aborted.
    pub tcp_inactive: Duration,
    /// A TCP flow not established this long after it opened is aborted.
    pub tcp_handshake: Duration,
    /// Handshakes per second (all peers) before cookies are required.
    pub handshakes_per_second: u64,
    /// Where peers may open flows to.
    pub egress: EgressPolicy,
    pub peer_limits: PeerLimits,
    pub global_limits: GlobalLimits,
}

/// A peer counts among those the global flow bounds are shared by while its last handshake
/// is this recent: WireGuard rekeys every 2 minutes while traffic flows (a peer holding
/// flows always counts), and drops a session unused for 3; an ACTIVE client whose laptop
/// sleeps does not shrink the others' share.
const LIVE: Duration = Duration::from_secs(300);

/// What the control plane tells each worker: the whole peer table (each keeps its own),
/// the addresses of Stowaway's own Services.
pub enum Command {
    Peers(Arc<BTreeMap<Key, PeerSpec>>),
    OwnServices(Arc<[IpAddr]>),
    Stop,
}

/// What the workers publish for the control plane (status write-back, metrics, probes),
/// each in its own slot.
pub struct Shared {
    stats: Vec<Mutex<BTreeMap<String, PeerStats>>>,
    /// Unix seconds of each worker's last tick (liveness).
    heartbeats: Vec<AtomicU64>,
}

impl Shared {
    /// Room for `workers` workers.
    pub fn new(workers: usize) -> Self {
        let workers = workers.max(1);
        Self {
            stats: (0..workers).map(|_| Mutex::default()).collect(),
            heartbeats: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Every peer's counters, by client (each peer is on one worker).
    pub fn peer_stats(&self) -> BTreeMap<String, PeerStats> {
        let mut all = BTreeMap::new();
        for slot in &self.stats {
            all.extend(
                slot.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter()
                    .map(|(client, stats)| (client.clone(), *stats)),
            );
        }
        all
    }

    /// Peers (on every worker) whose last handshake is at most `within` old, as last
    /// published.
    pub fn live_peers(&self, within: Duration) -> usize {
        self.stats
            .iter()
            .map(|slot| {
                slot.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .values()
                    .filter(|stats| stats.since_handshake.is_some_and(|since| since <= within))
                    .count()
            })
            .sum()
    }

    /// Unix seconds of the least recent worker's last tick (0: one has not ticked yet).
    pub fn heartbeat(&self) -> u64 {
        self.heartbeats
            .iter()
            .map(|beat| beat.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }
}

impl Default for Shared {
    fn default() -> Self {
        Self::new(1)
    }
}

/// What one worker hands another: what arrived on its side for a peer of the other's.
enum Handoff {
    /// A WireGuard datagram (an initiation, or one the kernel did not steer).
    Datagram(SocketAddr, Vec<u8>),
    /// A connection accepted on a forward listener (or the bridges port: `bridged`), for
    /// the peer that holds `target`.
    Forward {
        stream: mio::net::TcpStream,
        target: SocketAddr,
        from: SocketAddr,
        bridged: Option<Bridged>,
    },
}

/// How to reach a worker's loop: its queue of handoffs and its waker.
struct Link {
    handoffs: mpsc::SyncSender<Handoff>,
    waker: Arc<Waker>,
    /// Bytes of the datagrams in its queue.
    queued_bytes: Arc<AtomicUsize>,
}

/// Handoffs one worker may have waiting (beyond: dropped, counted as `handoff_queue_full`).
const HANDOFFS: usize = 4_096;
/// Bytes of datagrams one worker may have waiting from the others (a datagram may be 64 KiB:
/// the count alone would let 256 MiB wait).
const HANDOFF_BYTES: usize = 8 << 20;

/// The control plane's side: send commands to every worker, wake their loops, hand in
/// connections accepted outside the data plane.
#[derive(Clone)]
pub struct Handle {
    workers: Vec<(mpsc::Sender<Command>, Arc<Waker>)>,
    /// Every worker's queue of handoffs.
    links: Arc<[Link]>,
    /// The peer table as last set (to find the worker of a handed-in connection's target).
    peers: Arc<Mutex<Arc<BTreeMap<Key, PeerSpec>>>>,
}

/// Why `Handle::hand_in` did not take a connection (it is closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandInError {
    /// No peer holds the target.
    NoPeer,
    /// The worker of the target's peer has a full queue.
    QueueFull,
    /// The data plane has stopped.
    Stopped,
}

impl Handle {
    pub fn set_peers(&self, peers: BTreeMap<Key, PeerSpec>) {
        let peers = Arc::new(peers);
        *self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = peers.clone();
        for (commands, waker) in &self.workers {
            Self::send(commands, waker, Command::Peers(peers.clone()));
        }
    }

    /// The peer table as last set.
    pub fn peers(&self) -> Arc<BTreeMap<Key, PeerSpec>> {
        self.peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Hands a connection accepted outside the data plane (the bridges port) to the worker
    /// of the peer that holds `target`, as if it had arrived on a forward listener: through
    /// that peer's tunnel if the peer is still `bridged.client`'s when the worker takes it,
    /// within the peer's flow limits.
    pub fn hand_in(
        &self,
        stream: std::net::TcpStream,
        target: SocketAddr,
        from: SocketAddr,
        bridged: Bridged,
    ) -> Result<(), HandInError> {
        let worker = {
            let peers = self.peers();
            let holder =
                crate::peers::route(peers.values(), target.ip()).ok_or(HandInError::NoPeer)?;
            shard::worker_of_key(&holder.public_key, self.links.len())
        };
        let link = self.links.get(worker).ok_or(HandInError::Stopped)?;
        stream
            .set_nonblocking(true)
            .map_err(|_| HandInError::Stopped)?;
        let handoff = Handoff::Forward {
            stream: mio::net::TcpStream::from_std(stream),
            target,
            from,
            bridged: Some(bridged),
        };
        match link.handoffs.try_send(handoff) {
            Ok(()) => {
                let _ = link.waker.wake();
                Ok(())
            }
            Err(mpsc::TrySendError::Full(_)) => Err(HandInError::QueueFull),
            Err(mpsc::TrySendError::Disconnected(_)) => Err(HandInError::Stopped),
        }
    }

    /// The addresses of Stowaway's own Services: refused from now on, flows to them end.
    pub fn set_own_services(&self, addresses: Vec<IpAddr>) {
        let addresses: Arc<[IpAddr]> = addresses.into();
        for (commands, waker) in &self.workers {
            Self::send(commands, waker, Command::OwnServices(addresses.clone()));
        }
    }

    pub fn stop(&self) {
        for (commands, waker) in &self.workers {
            Self::send(commands, waker, Command::Stop);
        }
    }

    fn send(commands: &mpsc::Sender<Command>, waker: &Waker, command: Command) {
        // A stopped worker has nothing left to tell.
        if commands.send(command).is_ok() {
            let _ = waker.wake();
        }
    }
}

/// What a flow of the table is.
enum FlowKind {
    /// A peer's TCP connection whose cluster-side dial is under way.
    Dial(tcp::Dial),
    Tcp(tcp::TcpFlow),
    Udp(udp::UdpFlow),
}

/// One worker of the data plane.
pub struct DataPlane {
    config: Config,
    shard: Shard,
    poll: Poll,
    wireguard: UdpSocket,
    commands: mpsc::Receiver<Command>,
    handoffs: mpsc::Receiver<Handoff>,
    /// Every worker's queue and waker, by worker.
    workers: Arc<[Link]>,
    /// The whole peer table as last told (to find the worker of a forward's target).
    all_peers: Arc<BTreeMap<Key, PeerSpec>>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    endpoint: Endpoint,
    stack: Interface,
    queues: Queues,
    sockets: SocketSet<'static>,
    listeners: Vec<(TcpListener, Forward)>,
    flows: FlowTable<FlowKind>,
    next_port: u16,
    started: Instant,
    /// The time of this turn of the event loop.
    now: Instant,
    buffer: Vec<u8>,
    /// Datagrams for the WireGuard socket: this turn's, and those it could not take yet
    /// (sent when it is writable again, so that a burst from the stack is delayed rather
    /// than lost).
    outbox: outbox::Outbox,
    /// The socket's send buffer was full at the last flush.
    outbox_full: bool,
    /// Segmented sends the kernel refused in a row.
    segmentation_failures: u32,
    /// The WireGuard socket had more to read when this turn's share was used up.
    wireguard_pending: bool,
    /// Data datagrams read and not yet decrypted, by peer.
    inbox: inbox::Inbox<u32>,
    /// UDP flows with datagrams left when their share of a turn was used up.
    udp_pending: HashSet<Token>,
    /// ICMP errors still allowed this second.
    icmp_budget: u32,
    /// The last pump stopped at its bound with work left: do not sleep.
    unfinished: bool,
}

impl DataPlane {
    /// Binds every socket of `workers` workers (so a taken port fails here, before anything
    /// runs): one WireGuard socket each on `config.listen`, the forward listeners on the
    /// first. Each worker is run on its own thread (`run`).
    pub fn bind(
        config: Config,
        private_key: Key,
        workers: usize,
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
    ) -> io::Result<(Vec<Self>, Handle)> {
        let shards: Vec<Shard> = (0..workers)
            .map(|id| Shard::new(id, workers))
            .collect::<Option<_>>()
            .filter(|_| workers > 0 && shared.stats.len() >= workers)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{workers} data-plane workers: give 1 to {}",
                        shard::MAX_WORKERS
                    ),
                )
            })?;
        let (sockets, refused) = shard::bind_group(config.listen, workers).map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("binding the WireGuard socket {}: {error}", config.listen),
            )
        })?;
        if let Some(error) = refused {
            tracing::warn!(%error, "the kernel refused to steer datagrams to their peer's worker (SO_ATTACH_REUSEPORT_CBPF); workers hand over what reaches the wrong one");
        }
        let mut polls = Vec::new();
        let mut links = Vec::new();
        let mut queues = Vec::new();
        for socket in sockets {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
            socket.set_nonblocking(true)?;
            let mut wireguard = UdpSocket::from_std(socket);
            poll.registry().register(
                &mut wireguard,
                WIREGUARD,
                Interest::READABLE | Interest::WRITABLE,
            )?;
            let (handoffs, handoffs_in) = mpsc::sync_channel(HANDOFFS);
            let (commands, commands_in) = mpsc::channel();
            links.push(Link {
                handoffs,
                waker: waker.clone(),
                queued_bytes: Arc::default(),
            });
            queues.push((commands, waker));
            polls.push((poll, wireguard, commands_in, handoffs_in));
        }
        let links: Arc<[Link]> = links.into();
        metrics
            .workers
            .set(i64::try_from(workers).unwrap_or(i64::MAX));
        let limiter = Endpoint::limiter(private_key, config.handshakes_per_second);
        let ledger = Arc::new(Mutex::new(Ledger::new(
            config.peer_limits,
            config.global_limits,
        )));
        let mut planes = Vec::new();
        for (shard, (poll, wireguard, commands, handoffs)) in shards.into_iter().zip(polls) {
            let listeners = if shard.id() == 0 {
                bind_listeners(&config.forwards, &poll)?
            } else {
                Vec::new()
            };
            let mut queues = Queues {
                inbound: VecDeque::new(),
                outbound: Vec::new(),
                mtu: config.mtu,
            };
            let stack = new_stack(&mut queues);
            let started = Instant::now();
            planes.push(Self {
                endpoint: Endpoint::worker(private_key, limiter.clone(), shard),
                icmp_budget: icmp_budget(shard),
                shard,
                poll,
                wireguard,
                commands,
                handoffs,
                workers: links.clone(),
                all_peers: Arc::default(),
                shared: shared.clone(),
                metrics: metrics.clone(),
                stack,
                queues,
                sockets: SocketSet::new(Vec::new()),
                listeners,
                flows: FlowTable::new(ledger.clone(), FIRST_FLOW),
                next_port: 49_152,
                started,
                now: started,
                buffer: vec![0; DATAGRAM],
                outbox: outbox::Outbox::new(tunnel::OUTBOX_BYTES, true),
                outbox_full: false,
                segmentation_failures: 0,
                wireguard_pending: false,
                inbox: inbox::Inbox::new(tunnel::PEER_INBOX, tunnel::INBOX),
                udp_pending: HashSet::new(),
                unfinished: false,
                config: config.clone(),
            });
        }
        Ok((
            planes,
            Handle {
                workers: queues,
                links,
                peers: Arc::default(),
            },
        ))
    }

    /// The WireGuard socket's address (the port, when bound to port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.wireguard.local_addr()
    }

    /// Runs until `Handle::stop` (or the handle is dropped).
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        // Made here, on the data plane's own thread (its system-call headers stay on it).
        let mut reader = reader::Reader::new();
        let mut next_tick = Instant::now();
        loop {
            self.now = Instant::now();
            if self.now >= next_tick {
                self.tick();
                next_tick = self.now + Duration::from_secs(1);
            }
            let stack_delay = self
                .stack
                .poll_delay(self.stack_now(), &self.sockets)
                .map(|delay| Duration::from_micros(delay.total_micros()));
            let busy = self.unfinished
                || self.wireguard_pending
                || !self.inbox.is_empty()
                || !self.udp_pending.is_empty();
            let timeout = if busy {
                Duration::ZERO
            } else {
                stack_delay
                    .unwrap_or(Duration::MAX)
                    .min(next_tick.saturating_duration_since(self.now))
            };
            if let Err(error) = self.poll.poll(&mut events, Some(timeout)) {
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            self.now = Instant::now();
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
                            self.wireguard_pending = true;
                        }
                    }
                    WAKER => {
                        if !self.take_commands() {
                            return Ok(());
                        }
                        self.take_handoffs();
                    }
                    Token(index) if index < FIRST_FLOW => self.accept(index - FIRST_LISTENER),
                    token => self.flow_event(token, event.is_readable(), event.is_writable()),
                }
            }
            // Every source gets a bounded share of this turn: the tunnel, then each UDP flow
            // with datagrams waiting, then every TCP flow (in `pump`).
            if self.wireguard_pending || !self.inbox.is_empty() {
                self.receive_datagrams(&mut reader);
            }
            if !self.udp_pending.is_empty() {
                let ready: Vec<Token> = self.udp_pending.drain().collect();
                for token in ready {
                    self.udp_readable(token);
                }
            }
            self.pump();
            // What this turn wrote for the peers, in as few system calls as it allows.
            self.flush_outbox();
        }
    }

    fn stack_now(&self) -> smoltcp::time::Instant {
        gefyra_netstack::interface::clock(self.started, Instant::now())
    }

    /// Applies the control plane's commands; `false` to stop.
    fn take_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Peers(desired)) => self.set_peers(desired),
                Ok(Command::OwnServices(addresses)) => self.set_own_services(&addresses),
                Ok(Command::Stop) | Err(mpsc::TryRecvError::Disconnected) => return false,
                Err(mpsc::TryRecvError::Empty) => return true,
            }
        }
    }

    /// Takes the whole peer table; keeps the peers this worker owns.
    fn set_peers(&mut self, desired: Arc<BTreeMap<Key, PeerSpec>>) {
        self.metrics
            .peers
            .set(i64::try_from(desired.len()).unwrap_or(i64::MAX));
        let own: BTreeMap<Key, PeerSpec> = desired
            .iter()
            .filter(|(key, _)| self.shard.owns_key(key))
            .map(|(key, spec)| (*key, spec.clone()))
            .collect();
        self.all_peers = desired;
        let plan = crate::peers::plan(&self.endpoint.specs(), &own);
        if plan == crate::peers::Plan::default() {
            return;
        }
        tracing::info!(
            worker = self.shard.id(),
            added = plan.add.len(),
            updated = plan.update.len(),
            replaced = plan.replace.len(),
            removed = plan.remove.len(),
            peers = own.len(),
            "peer table changed"
        );
        self.endpoint.apply(plan);
        // Flows whose address is no longer their peer's (it left, or the address changed
        // hands) end now: a peer never inherits another's flows.
        let endpoint = &self.endpoint;
        let orphaned = self
            .flows
            .with_another_owner(|address| endpoint.owner(address));
        for token in orphaned {
            self.end_flow(token, "its address is no longer its peer's");
        }
    }

    /// Shares the global flow bounds among the live peers (of every worker, as last
    /// published); when more peers shrink the share, a peer of this worker over it gives
    /// back its least recently active flows.
    fn share_among_live_peers(&mut self) {
        let live = self.shared.live_peers(LIVE);
        self.metrics
            .live_peers
            .set(i64::try_from(live).unwrap_or(i64::MAX));
        self.flows.ledger().set_peers(live);
        for token in self.flows.over_share() {
            if let Some(flow) = self.flows.get(token) {
                self.metrics
                    .expiries
                    .with_label_values(&[flow.tuple.0.label(), "over_share"])
                    .inc();
            }
            self.end_flow(token, "its peer holds more than its share");
        }
    }

    /// Refuses the addresses of Stowaway's own Services; flows to them (opened before they
    /// were known) end.
    fn set_own_services(&mut self, addresses: &[IpAddr]) {
        self.config.egress.set_own_services(addresses.to_vec());
        let to_them: Vec<Token> = self
            .flows
            .iter()
            .filter(|(_, flow)| addresses.contains(&flow.tuple.2.ip().to_canonical()))
            .map(|(token, _)| token)
            .collect();
        for token in to_them {
            self.end_flow(token, "its destination is one of Stowaway's own Services");
        }
    }

    fn tick(&mut self) {
        for (to, datagram) in self.endpoint.tick() {
            self.send_datagram(to, &datagram);
        }
        self.icmp_budget = icmp_budget(self.shard);
        self.expire_flows();
        let worker = self.shard.id();
        if let Some(slot) = self.shared.stats.get(worker) {
            *slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = self.endpoint.peer_stats();
        }
        self.share_among_live_peers();
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if let Some(beat) = self.shared.heartbeats.get(worker) {
            beat.store(unix, Ordering::Relaxed);
        }
        self.pump();
    }

    /// Ends flows past their timeouts, each expiry counted by protocol and timeout.
    fn expire_flows(&mut self) {
        let now = self.now;
        let config = &self.config;
        let mut expired = Vec::new();
        for (token, flow) in self.flows.iter() {
            let since_opened = now.saturating_duration_since(flow.opened);
            let since_heard = now.saturating_duration_since(flow.last_heard);
            let since_active = now.saturating_duration_since(flow.last_active);
            let timeout = match &flow.kind {
                FlowKind::Dial(_) => (since_opened >= config.dial_timeout).then_some("dial"),
                FlowKind::Udp(_) => (since_heard >= config.udp_idle).then_some("idle"),
                FlowKind::Tcp(flow) => {
                    let state = self
                        .sockets
                        .get::<smoltcp::socket::tcp::Socket>(flow.socket)
                        .state();
                    tcp::timed_out(state, since_opened, since_heard, since_active, config)
                }
            };
            if let Some(timeout) = timeout {
                expired.push((token, flow.tuple.0, timeout));
            }
        }
        for (token, protocol, timeout) in expired {
            tracing::debug!(protocol = protocol.label(), timeout, "flow expired");
            self.metrics
                .expiries
                .with_label_values(&[protocol.label(), timeout])
                .inc();
            self.end_flow(token, "timed out");
        }
    }

    /// Takes a flow out of the table and gives back what it held; the caller closes it.
    fn remove_flow(&mut self, token: Token) -> Option<flows::Flow<FlowKind>> {
        self.udp_pending.remove(&token);
        self.flows.remove(token)
    }

    /// The flow a packet of `peer` with this tuple belongs to. A packet under the tuple of
    /// another peer's flow (ranges that overlap, or a race with a peer-table change) is
    /// counted here and dropped by the caller: it neither reaches that flow nor ends it.
    fn flow_of(&self, peer: &str, tuple: &Tuple) -> Lookup {
        let found = self.flows.lookup(tuple, peer);
        if let Lookup::Foreign(_) = found {
            self.metrics
                .dropped
                .with_label_values(&["another_peers_flow"])
                .inc();
        }
        found
    }

    /// Ends a flow now (`why`, for a dial's log): a TCP flow is reset (and removed once the
    /// stack has sent the RST), a dial refused, a UDP flow closed.
    fn end_flow(&mut self, token: Token, why: &str) {
        match self.flows.get(token).map(|flow| &flow.kind) {
            Some(FlowKind::Tcp(flow)) => {
                self.sockets
                    .get_mut::<smoltcp::socket::tcp::Socket>(flow.socket)
                    .abort();
            }
            Some(FlowKind::Dial(_)) => self.dial_failed(token, why),
            Some(FlowKind::Udp(_)) => self.close_udp(token),
            None => {}
        }
    }

    fn flow_event(&mut self, token: Token, readable: bool, writable: bool) {
        match self.flows.get_mut(token).map(|flow| &mut flow.kind) {
            Some(FlowKind::Dial(_)) => self.dial_event(token),
            Some(FlowKind::Tcp(flow)) => {
                flow.readable |= readable;
                flow.writable |= writable;
            }
            Some(FlowKind::Udp(_)) if readable => {
                self.udp_pending.insert(token);
            }
            _ => {}
        }
    }

    /// Where a connection or datagram to `destination` really goes: 192.168.99.1:53 is the
    /// resolver, other ports of the server address go nowhere; anything else only where the
    /// egress policy lets a peer go. A refusal is counted (`no_service`, `egress_denied`)
    /// and logged, as `admit` does for limits.
    fn target_of(&self, destination: SocketAddr) -> Option<SocketAddr> {
        let ip = destination.ip();
        let refused = if ip == SERVER_ADDRESS || ip == IpAddr::V6(SERVER_ADDRESS_V6) {
            if destination.port() == 53 {
                return Some(self.config.resolver);
            }
            "no_service"
        } else {
            match self.config.egress.check(ip) {
                Ok(()) => return Some(destination),
                Err(refusal) => {
                    tracing::debug!(%destination, %refusal, "egress denied");
                    "egress_denied"
                }
            }
        };
        self.metrics.dropped.with_label_values(&[refused]).inc();
        None
    }

    /// Admits a flow for `peer` in the ledger; a refusal is counted and logged.
    fn admit(&mut self, peer: &PeerId, holding: Holding, tuple: Tuple) -> bool {
        match self.flows.admit(peer, holding) {
            Ok(()) => true,
            Err(hit) => {
                tracing::debug!(client = %peer, protocol = tuple.0.label(), destination = %tuple.2, limit = %hit, "flow refused: over a limit");
                self.metrics
                    .dropped
                    .with_label_values(&[hit.reason()])
                    .inc();
                false
            }
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
}

/// The forward listeners, registered with `poll`.
fn bind_listeners(forwards: &[Forward], poll: &Poll) -> io::Result<Vec<(TcpListener, Forward)>> {
    let mut listeners = Vec::new();
    for (index, forward) in forwards.iter().enumerate() {
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
    Ok(listeners)
}

/// A worker's userspace stack: it answers for every destination (it stands in for the
/// whole cluster).
fn new_stack(queues: &mut Queues) -> Interface {
    gefyra_netstack::interface::new(
        queues,
        &[SERVER_ADDRESS, IpAddr::V6(SERVER_ADDRESS_V6)],
        true,
    )
}

/// A worker's share of the ICMP errors sent per second (all workers together keep to
/// `ICMP_ERRORS_PER_SECOND`, each at least one).
fn icmp_budget(shard: Shard) -> u32 {
    let count = u32::try_from(shard.count()).unwrap_or(1).max(1);
    (tunnel::ICMP_ERRORS_PER_SECOND / count).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection handed in from the bridges port goes to the queue of the worker whose
    /// peer holds its target, marked as the bridge's; refused without a holder, and when
    /// that queue is full.
    #[test]
    fn a_handed_in_connection_goes_to_the_worker_of_its_targets_peer() {
        let workers = 2;
        let (mut planes, handle) = DataPlane::bind(
            tcp::tests::config(300, 10),
            [1; 32],
            workers,
            Arc::new(Shared::new(workers)),
            Arc::new(Metrics::default()),
        )
        .expect("two workers");
        let key = (0..=u8::MAX)
            .map(|byte| [byte; 32])
            .find(|key| shard::worker_of_key(key, workers) == 1)
            .expect("a key of worker 1");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let mut routers = Vec::new();
        let mut accept = || {
            routers.push(std::net::TcpStream::connect(address).unwrap());
            listener.accept().unwrap().0
        };
        let target: SocketAddr = "192.168.99.2:8080".parse().unwrap();
        let from: SocketAddr = "10.244.0.9:40000".parse().unwrap();
        let bridged = Bridged {
            bridge: "b1".into(),
            client: "dev".into(),
        };
        assert_eq!(
            handle.hand_in(accept(), target, from, bridged.clone()),
            Err(HandInError::NoPeer)
        );
        handle.set_peers(BTreeMap::from([(
            key,
            PeerSpec {
                client: "dev".into(),
                public_key: key,
                preshared_key: [0; 32],
                ranges: vec!["192.168.99.2/32".parse().unwrap()],
            },
        )]));
        assert_eq!(
            handle.hand_in(accept(), target, from, bridged.clone()),
            Ok(())
        );
        assert!(planes[0].handoffs.try_recv().is_err());
        assert!(matches!(
            planes[1].handoffs.try_recv(),
            Ok(Handoff::Forward { target: to, bridged: Some(whose), .. })
                if to == target && whose == bridged
        ));
        for _ in 0..HANDOFFS {
            planes[0].hand_over(1, Handoff::Datagram(from, vec![4]));
        }
        assert_eq!(
            handle.hand_in(accept(), target, from, bridged),
            Err(HandInError::QueueFull)
        );
    }

    /// The global bounds are shared among the peers of every worker with a recent
    /// handshake; configured peers that never or long ago handshook do not count.
    #[test]
    fn live_peers_are_those_of_every_worker_with_a_recent_handshake() {
        let shared = Shared::new(2);
        let stats = |since: Option<u64>| PeerStats {
            since_handshake: since.map(Duration::from_secs),
            ..PeerStats::default()
        };
        *shared.stats[0].lock().unwrap() = BTreeMap::from([
            ("a".to_string(), stats(Some(10))),
            ("b".to_string(), stats(None)),
        ]);
        *shared.stats[1].lock().unwrap() = BTreeMap::from([
            ("c".to_string(), stats(Some(301))),
            ("d".to_string(), stats(Some(300))),
        ]);
        assert_eq!(shared.live_peers(LIVE), 2);
    }
}
