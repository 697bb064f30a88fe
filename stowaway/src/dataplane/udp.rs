//! UDP: each (peer source, destination) pair is relayed through a socket of its own, so
//! replies find their way back; a pair idle for `--udp-idle-timeout` is closed.

use std::io;
use std::net::{Ipv6Addr, SocketAddr};

use mio::net::UdpSocket;
use mio::{Interest, Token};

use super::{DataPlane, Flow, FlowKind, PeerId, Tuple};
use crate::packet;
use crate::policy::Holding;

/// Datagrams relayed from one flow's cluster side in one turn of the event loop.
const DATAGRAMS_PER_TURN: usize = 64;

pub(super) struct UdpFlow {
    socket: UdpSocket,
}

impl DataPlane {
    /// A datagram from a peer: relayed on its flow (opened if the policy and the peer's
    /// limits allow it; refused with an ICMP error otherwise).
    pub(super) fn relay_udp(&mut self, peer: PeerId, tuple: Tuple, payload: &[u8], packet: &[u8]) {
        let token = match self.tuples.get(&tuple) {
            Some(token) => *token,
            None => match self.open_udp(peer, tuple) {
                Some(token) => token,
                None => {
                    self.prohibited(packet);
                    return;
                }
            },
        };
        let Some(flow) = self.flows.get_mut(&token) else {
            return;
        };
        flow.last_heard = self.now;
        let FlowKind::Udp(udp) = &flow.kind else {
            return;
        };
        if let Err(error) = udp.socket.send(payload) {
            tracing::debug!(destination = %tuple.2, %error, "relaying a UDP datagram failed");
        }
    }

    fn open_udp(&mut self, peer: PeerId, tuple: Tuple) -> Option<Token> {
        let target = self.target_of(tuple.2)?;
        if !self.admit(&peer, Holding::Udp, tuple) {
            return None;
        }
        let local: SocketAddr = match target {
            SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let token = self.token();
        let opened = UdpSocket::bind(local).and_then(|mut socket| {
            socket.connect(target)?;
            self.poll
                .registry()
                .register(&mut socket, token, Interest::READABLE)?;
            Ok(socket)
        });
        let socket = match opened {
            Ok(socket) => socket,
            Err(error) => {
                tracing::debug!(%target, %error, "opening a UDP flow failed");
                self.ledger().release(&peer, Holding::Udp);
                return None;
            }
        };
        self.metrics
            .flows_total
            .with_label_values(&["udp", "opened"])
            .inc();
        self.metrics.flows.with_label_values(&["udp"]).inc();
        self.insert_flow(
            token,
            peer,
            Holding::Udp,
            tuple,
            FlowKind::Udp(UdpFlow { socket }),
        );
        Some(token)
    }

    /// Relays up to a turn's share of replies to the peer; more waiting keeps the flow in
    /// `udp_pending`.
    pub(super) fn udp_readable(&mut self, token: Token) {
        let mut buffer = std::mem::take(&mut self.buffer);
        for _ in 0..DATAGRAMS_PER_TURN {
            let Some(flow) = self.flows.get_mut(&token) else {
                break;
            };
            let FlowKind::Udp(udp) = &flow.kind else {
                break;
            };
            let length = match udp.socket.recv(&mut buffer) {
                Ok(length) => length,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.buffer = buffer;
                    return;
                }
                // e.g. ICMP port unreachable from the destination.
                Err(_) => continue,
            };
            flow.last_heard = self.now;
            // Replies come from where the peer sent to, to the peer's source.
            let (from, to) = (flow.tuple.2, flow.tuple.1);
            if let Some(packet) = packet::udp_packet(from, to, &buffer[..length]) {
                self.send_to_peer(&packet);
            }
        }
        self.buffer = buffer;
        if self.flows.contains_key(&token) {
            self.udp_pending.insert(token);
        }
    }

    pub(super) fn close_udp(&mut self, token: Token) {
        if let Some(Flow {
            kind: FlowKind::Udp(mut flow),
            ..
        }) = self.remove_flow(token)
        {
            let _ = self.poll.registry().deregister(&mut flow.socket);
            self.metrics.flows.with_label_values(&["udp"]).dec();
        }
    }
}
