//! UDP: each (peer source, destination) pair is relayed through a socket of its own, so
//! replies find their way back; a pair idle for `--udp-idle-timeout` is closed.

use std::io;
use std::net::{Ipv6Addr, SocketAddr};

use mio::net::UdpSocket;
use mio::{Interest, Token};

use super::flows::{Flow, Lookup, PeerId, Tuple};
use super::{DataPlane, FlowKind};
use crate::policy::Holding;
use gefyra_netstack::packet;

/// Datagrams relayed from one flow's cluster side in one turn of the event loop.
const DATAGRAMS_PER_TURN: usize = 64;

pub(super) struct UdpFlow {
    socket: UdpSocket,
}

impl DataPlane {
    /// A datagram from a peer: relayed on its flow (opened if the policy and the peer's
    /// limits allow it; refused with an ICMP error otherwise).
    pub(super) fn relay_udp(&mut self, peer: PeerId, tuple: Tuple, payload: &[u8], packet: &[u8]) {
        let token = match self.flow_of(&peer, &tuple) {
            Lookup::Own(token) => token,
            Lookup::Foreign(_) => return,
            Lookup::Missing => match self.open_udp(peer, tuple) {
                Some(token) => token,
                None => {
                    self.prohibited(packet);
                    return;
                }
            },
        };
        let Some(flow) = self.flows.get_mut(token) else {
            return;
        };
        flow.last_heard = self.now;
        flow.last_active = self.now;
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
        let token = self.flows.token();
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
                self.flows.release(&peer, Holding::Udp);
                return None;
            }
        };
        self.metrics
            .flows_total
            .with_label_values(&["udp", "opened"])
            .inc();
        self.metrics.open_flows.with_label_values(&["udp"]).inc();
        self.flows.insert(
            token,
            peer,
            Holding::Udp,
            tuple,
            FlowKind::Udp(UdpFlow { socket }),
            self.now,
        );
        Some(token)
    }

    /// Relays up to a turn's share of replies to the peer; more waiting keeps the flow in
    /// `udp_pending`.
    pub(super) fn udp_readable(&mut self, token: Token) {
        let mut buffer = std::mem::take(&mut self.buffer);
        for _ in 0..DATAGRAMS_PER_TURN {
            let Some(flow) = self.flows.get_mut(token) else {
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
            flow.last_active = self.now;
            // Replies come from where the peer sent to, to the peer's source.
            let (from, to) = (flow.tuple.2, flow.tuple.1);
            if let Some(packet) = packet::udp_packet(from, to, &buffer[..length]) {
                self.send_to_peer(&packet);
            }
        }
        self.buffer = buffer;
        if self.flows.contains(token) {
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
            self.metrics.open_flows.with_label_values(&["udp"]).dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::flows::Protocol;
    use super::super::tcp::tests::config;
    use super::super::{DataPlane, FlowKind, Shared};
    use super::*;
    use crate::metrics::Metrics;
    use crate::peers::{Key, PeerSpec};
    use crate::policy::{GlobalLimits, PeerLimits, Share};

    fn peer(client: &str, key: u8, range: &str) -> (Key, PeerSpec) {
        let spec = PeerSpec {
            client: client.into(),
            public_key: [key; 32],
            preshared_key: [0; 32],
            ranges: vec![range.parse().unwrap()],
        };
        ([key; 32], spec)
    }

    /// One worker with room for a few flows, and a UDP flow of `a` from 192.168.96.2.
    fn plane_with_a_flow(metrics: Arc<Metrics>) -> (DataPlane, Token, Tuple) {
        let mut config = config(300, 10);
        config.peer_limits = PeerLimits {
            tcp_flows: 8,
            dials: 8,
            udp_flows: 8,
            buffer_bytes: 1 << 30,
        };
        config.global_limits = GlobalLimits {
            flows: 64,
            buffer_bytes: 1 << 30,
            share_floor: Share::default(),
        };
        let (mut planes, _handle) =
            DataPlane::bind(config, [1; 32], 1, Arc::new(Shared::new(1)), metrics)
                .expect("a worker");
        let mut plane = planes.remove(0);
        plane.set_peers(Arc::new(BTreeMap::from([
            peer("a", 2, "192.168.96.2/32"),
            peer("b", 3, "192.168.96.3/32"),
        ])));
        let tuple = (
            Protocol::Udp,
            "192.168.96.2:5353".parse().unwrap(),
            "10.77.0.1:53".parse().unwrap(),
        );
        let socket = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).expect("a socket");
        plane
            .flows
            .admit(&"a".to_string(), Holding::Udp)
            .expect("room");
        let token = plane.flows.token();
        plane.flows.insert(
            token,
            "a".into(),
            Holding::Udp,
            tuple,
            FlowKind::Udp(UdpFlow { socket }),
            plane.now,
        );
        (plane, token, tuple)
    }

    #[test]
    fn a_flow_ends_when_its_address_changes_hands_in_one_peer_table_update() {
        let (mut plane, token, _) = plane_with_a_flow(Arc::new(Metrics::default()));
        // a keeps its address (b changes): the flow stays.
        plane.set_peers(Arc::new(BTreeMap::from([
            peer("a", 2, "192.168.96.2/32"),
            peer("b", 3, "192.168.97.3/32"),
        ])));
        assert!(plane.flows.contains(token));
        // a and b swap addresses in one update: b must not inherit a's flow.
        plane.set_peers(Arc::new(BTreeMap::from([
            peer("a", 2, "192.168.96.3/32"),
            peer("b", 3, "192.168.96.2/32"),
        ])));
        assert!(!plane.flows.contains(token));
        assert_eq!(
            plane.flows.ledger().total(),
            crate::policy::Usage::default()
        );
    }

    #[test]
    fn another_peers_datagram_under_a_flows_tuple_neither_reaches_nor_ends_it() {
        let metrics = Arc::new(Metrics::default());
        let (mut plane, token, tuple) = plane_with_a_flow(metrics.clone());
        plane.now += Duration::from_secs(5);
        plane.relay_udp("b".into(), tuple, b"not a's", b"");
        let flow = plane.flows.get(token).expect("a's flow stays");
        assert!(
            flow.last_heard < plane.now,
            "b's datagram did not reach a's flow"
        );
        let dropped = metrics
            .dropped
            .with_label_values(&["another_peers_flow"])
            .get();
        assert_eq!(dropped, 1);
        plane.relay_udp("a".into(), tuple, b"a's", b"");
        assert_eq!(
            plane.flows.get(token).map(|flow| flow.last_heard),
            Some(plane.now)
        );
    }
}
