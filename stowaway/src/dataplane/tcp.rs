//! TCP: a peer's SYN is held while the cluster side is dialled; then the stack takes the
//! connection and bytes are copied between its socket and the cluster-side socket, each
//! flow a bounded share per round.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use mio::net::TcpStream;
use mio::{Interest, Token};
use smoltcp::socket::tcp;
use smoltcp::wire::IpListenEndpoint;

use gefyra_netstack::splice::{Splice, tcp_socket};

use super::flows::{Flow, PeerId, Protocol, Tuple};
use super::{Config, DataPlane, FlowKind};
use crate::policy::Holding;

/// Per-flow receive buffer of the userspace TCP stack (peer to cluster): the window the
/// peer may fill.
const TCP_RECEIVE_BUFFER: usize = 1 << 20;
/// Per-flow send buffer (cluster to peer): bounds the data in flight to the peer. The stack
/// does not pace and retransmits after at least 1 s, so every burst lost on the way costs
/// a second. Measured with iperf3 (`make bench`): 512 KiB gave 0.03–0.10 Gbit/s towards the
/// peer, 128 KiB 0.07–0.28, 64 KiB 0.43–0.54 (at or above the kernel baseline).
const TCP_SEND_BUFFER: usize = 64 << 10;
/// What one TCP flow reserves of its peer's and the global buffer space.
pub const TCP_FLOW_BUFFERS: usize = TCP_RECEIVE_BUFFER + TCP_SEND_BUFFER;
/// Bytes one flow may move in each direction per round of the pump, so that one busy flow
/// cannot keep the others waiting.
const FLOW_SHARE: usize = 64 << 10;
/// Keep-alives towards an idle peer, at most this far apart and at least three per
/// `--tcp-idle-timeout`: a live peer answers them, so only a vanished one goes silent that
/// long.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

fn keep_alive(config: &Config) -> smoltcp::time::Duration {
    let interval = KEEP_ALIVE
        .min(config.tcp_idle / 3)
        .max(Duration::from_millis(100));
    smoltcp::time::Duration::from_millis(u64::try_from(interval.as_millis()).unwrap_or(u64::MAX))
}

/// A peer's connection awaiting its cluster-side dial; the peer's SYN is held meanwhile.
pub(super) struct Dial {
    stream: TcpStream,
    syn: Vec<u8>,
}

/// A TCP flow: a stack socket on the tunnel side (the peer), an ordinary socket on the
/// cluster side (`stream`).
pub(super) type TcpFlow = Splice;

/// Which timeout a TCP flow has run out of, if any: the handshake's, the peer's silence
/// (`idle`: not even a keep-alive answered), or no payload either way (`inactive`: a live
/// peer holding a connection it does not use).
pub(super) fn timed_out(
    state: tcp::State,
    since_opened: Duration,
    since_heard: Duration,
    since_active: Duration,
    config: &Config,
) -> Option<&'static str> {
    match state {
        tcp::State::Listen | tcp::State::SynSent | tcp::State::SynReceived => {
            (since_opened >= config.tcp_handshake).then_some("handshake")
        }
        tcp::State::Closed | tcp::State::TimeWait => None,
        _ if since_heard >= config.tcp_idle => Some("idle"),
        _ => (since_active >= config.tcp_inactive).then_some("inactive"),
    }
}

impl DataPlane {
    /// A peer's SYN for a new connection: dial the cluster side if the policy and the
    /// peer's limits allow it, else refuse (a reset).
    pub(super) fn dial(&mut self, peer: PeerId, tuple: Tuple, syn: Vec<u8>) {
        let Some(target) = self.target_of(tuple.2) else {
            self.refuse(syn);
            return;
        };
        let holding = Holding::Tcp {
            dialing: true,
            buffer_bytes: TCP_FLOW_BUFFERS,
        };
        if !self.admit(&peer, holding, tuple) {
            self.refuse(syn);
            return;
        }
        let token = self.flows.token();
        let registered = TcpStream::connect(target).and_then(|mut stream| {
            self.poll.registry().register(
                &mut stream,
                token,
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok(stream)
        });
        match registered {
            Ok(stream) => self.flows.insert(
                token,
                peer,
                holding,
                tuple,
                FlowKind::Dial(Dial { stream, syn }),
                self.now,
            ),
            Err(error) => {
                tracing::debug!(peer = %tuple.1, destination = %tuple.2, %error, "dial failed");
                self.flows.release(&peer, holding);
                self.refuse(syn);
            }
        }
    }

    /// Hands the SYN to the stack with no socket to take it: the stack answers with a reset.
    fn refuse(&mut self, syn: Vec<u8>) {
        self.metrics
            .flows_total
            .with_label_values(&["tcp", "refused"])
            .inc();
        self.queues.inbound.push_back(syn);
    }

    pub(super) fn dial_failed(&mut self, token: Token, why: &str) {
        if !matches!(
            self.flows.get(token).map(|flow| &flow.kind),
            Some(FlowKind::Dial(_))
        ) {
            return;
        }
        let Some(Flow {
            tuple,
            kind: FlowKind::Dial(mut dial),
            ..
        }) = self.remove_flow(token)
        else {
            return;
        };
        tracing::debug!(peer = %tuple.1, destination = %tuple.2, why, "dial failed");
        let _ = self.poll.registry().deregister(&mut dial.stream);
        self.refuse(dial.syn);
    }

    pub(super) fn dial_event(&mut self, token: Token) {
        let Some(Flow {
            kind: FlowKind::Dial(dial),
            tuple,
            ..
        }) = self.flows.get(token)
        else {
            return;
        };
        let tuple = *tuple;
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
        let mut socket = new_socket(&self.config);
        if socket.listen(IpListenEndpoint::from(tuple.2)).is_err() {
            self.dial_failed(token, "the stack refused the listen endpoint");
            return;
        }
        let handle = self.sockets.add(socket);
        let mut held_syn = None;
        self.flows.change_kind(token, |kind| match kind {
            FlowKind::Dial(Dial { stream, syn }) => {
                let _ = stream.set_nodelay(true);
                held_syn = Some(syn);
                FlowKind::Tcp(TcpFlow::new(handle, stream))
            }
            other => other,
        });
        self.flows.dialed(token);
        tracing::debug!(?tuple, "TCP flow opened");
        if let Some(syn) = held_syn {
            self.queues.inbound.push_back(syn);
        }
        self.count_opened();
    }

    pub(super) fn count_opened(&self) {
        self.metrics
            .flows_total
            .with_label_values(&["tcp", "opened"])
            .inc();
        self.metrics.open_flows.with_label_values(&["tcp"]).inc();
    }

    /// Copies bytes between every flow's two sides, each a bounded share; whether any byte
    /// moved.
    pub(super) fn shuttle(&mut self) -> bool {
        let mut moved = false;
        let now = self.now;
        for flow in self.flows.values_mut() {
            let FlowKind::Tcp(tcp) = &mut flow.kind else {
                continue;
            };
            let socket = self.sockets.get_mut::<tcp::Socket>(tcp.socket);
            // A reset or aborted connection keeps what it had received; it goes nowhere now.
            if socket.state() == tcp::State::Closed {
                continue;
            }
            if tcp.pump(socket, FLOW_SHARE).any() {
                flow.last_active = now;
                moved = true;
            }
        }
        moved
    }

    pub(super) fn remove_finished(&mut self) {
        let finished: Vec<Token> = self
            .flows
            .iter()
            .filter(|(_, flow)| match &flow.kind {
                FlowKind::Tcp(tcp) => {
                    let state = self.sockets.get::<tcp::Socket>(tcp.socket).state();
                    state == tcp::State::Closed || state == tcp::State::TimeWait
                }
                _ => false,
            })
            .map(|(token, _)| token)
            .collect();
        for token in finished {
            let Some(Flow {
                tuple,
                kind: FlowKind::Tcp(mut flow),
                ..
            }) = self.remove_flow(token)
            else {
                continue;
            };
            tracing::debug!(
                ?tuple,
                state = %self.sockets.get::<tcp::Socket>(flow.socket).state(),
                peer_done = flow.tunnel_done,
                cluster_done = flow.stream_done,
                "TCP flow ended"
            );
            let _ = self.poll.registry().deregister(&mut flow.stream);
            // Whatever the peer had not finished is cut on the cluster side too.
            let _ = flow.stream.shutdown(Shutdown::Both);
            self.sockets.remove(flow.socket);
            self.metrics.open_flows.with_label_values(&["tcp"]).dec();
        }
    }

    /// A flow from the cluster side into the tunnel (a forward): the stack connects to
    /// `target` from `local`; the stream is the accepted cluster-side connection, given
    /// back if the flow was not opened (over a limit, most likely).
    pub(super) fn open_forwarded(
        &mut self,
        peer: PeerId,
        mut stream: TcpStream,
        target: SocketAddr,
        local: SocketAddr,
    ) -> Result<(), TcpStream> {
        let tuple = (Protocol::Tcp, target, local);
        let holding = Holding::Tcp {
            dialing: false,
            buffer_bytes: TCP_FLOW_BUFFERS,
        };
        if !self.admit(&peer, holding, tuple) {
            return Err(stream);
        }
        let mut socket = new_socket(&self.config);
        if let Err(error) = socket.connect(
            self.stack.context(),
            smoltcp::wire::IpEndpoint::from(target),
            smoltcp::wire::IpEndpoint::from(local),
        ) {
            tracing::warn!(%target, ?error, "forward connect failed");
            self.flows.release(&peer, holding);
            return Err(stream);
        }
        let token = self.flows.token();
        if self
            .poll
            .registry()
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .is_err()
        {
            self.flows.release(&peer, holding);
            return Err(stream);
        }
        let handle = self.sockets.add(socket);
        let _ = stream.set_nodelay(true);
        self.flows.insert(
            token,
            peer,
            holding,
            tuple,
            FlowKind::Tcp(TcpFlow::new(handle, stream)),
            self.now,
        );
        tracing::debug!(?tuple, "forwarded TCP flow opened");
        self.count_opened();
        Ok(())
    }
}

fn new_socket(config: &Config) -> tcp::Socket<'static> {
    tcp_socket(
        TCP_RECEIVE_BUFFER,
        TCP_SEND_BUFFER,
        Some(keep_alive(config)),
    )
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::policy::{EgressPolicy, GlobalLimits, PeerLimits};

    pub(in crate::dataplane) fn config(idle: u64, handshake: u64) -> Config {
        Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            resolver: "127.0.0.1:53".parse().unwrap(),
            forwards: Vec::new(),
            mtu: 1420,
            udp_idle: Duration::from_secs(60),
            dial_timeout: Duration::from_secs(10),
            tcp_idle: Duration::from_secs(idle),
            tcp_inactive: Duration::from_secs(1_800),
            tcp_handshake: Duration::from_secs(handshake),
            handshakes_per_second: 100,
            egress: EgressPolicy::new(Vec::new(), Vec::new(), Vec::new()),
            peer_limits: PeerLimits {
                tcp_flows: 1,
                dials: 1,
                udp_flows: 1,
                buffer_bytes: 1,
            },
            global_limits: GlobalLimits {
                flows: 1,
                buffer_bytes: 1,
                share_floor: crate::policy::Share::default(),
            },
        }
    }

    #[test]
    fn handshakes_are_bounded_from_the_open_and_established_flows_by_the_peers_silence_and_by_disuse()
     {
        let config = config(300, 10);
        let secs = Duration::from_secs;
        for state in [
            tcp::State::SynReceived,
            tcp::State::SynSent,
            tcp::State::Listen,
        ] {
            assert_eq!(timed_out(state, secs(9), secs(9), secs(9), &config), None);
            assert_eq!(
                timed_out(state, secs(10), secs(0), secs(0), &config),
                Some("handshake")
            );
        }
        for state in [
            tcp::State::Established,
            tcp::State::FinWait1,
            tcp::State::CloseWait,
        ] {
            // An old flow whose peer keeps answering and that carries data lives on.
            assert_eq!(
                timed_out(state, secs(86_400), secs(299), secs(60), &config),
                None
            );
            assert_eq!(
                timed_out(state, secs(301), secs(300), secs(300), &config),
                Some("idle")
            );
            // Its peer answers the keep-alives, but nothing moved for half an hour.
            assert_eq!(
                timed_out(state, secs(1_800), secs(10), secs(1_799), &config),
                None
            );
            assert_eq!(
                timed_out(state, secs(1_801), secs(10), secs(1_800), &config),
                Some("inactive")
            );
        }
        // Already ending: the stack finishes it.
        assert_eq!(
            timed_out(
                tcp::State::TimeWait,
                secs(1_000),
                secs(1_000),
                secs(1_000),
                &config
            ),
            None
        );
    }

    #[test]
    fn keep_alives_come_at_least_three_times_per_idle_timeout() {
        assert_eq!(keep_alive(&config(300, 10)).total_millis(), 30_000);
        assert_eq!(keep_alive(&config(3, 10)).total_millis(), 1_000);
        assert_eq!(keep_alive(&config(0, 10)).total_millis(), 100);
    }
}
