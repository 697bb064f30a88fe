//! The WireGuard socket: datagrams in (decrypted and routed to flows), datagrams out
//! (through a byte-bounded outbox), and the few packets Stowaway answers with itself.

use std::io;
use std::net::SocketAddr;

use super::{DataPlane, FlowKind, PeerId, Protocol};
use crate::endpoint::Drop;
use crate::packet::{self, Inbound};

/// Datagrams read from the WireGuard socket in one turn of the event loop.
const READS_PER_TURN: usize = 512;
/// Datagrams decrypted in one turn, taken from the peers' queues in turn, before the flows
/// get theirs: a peer flooding the socket cannot keep the loop from the others.
const DECRYPTS_PER_TURN: usize = 256;
/// Data datagrams one peer may have waiting for decryption (beyond: dropped, counted as
/// `peer_queue_full`), and all peers together.
pub(super) const PEER_INBOX: usize = 256;
pub(super) const INBOX: usize = 8_192;
/// Bytes of datagrams waiting for room in the WireGuard socket's send buffer, all peers
/// together (beyond: dropped and counted).
const OUTBOX_BYTES: usize = 16 << 20;
/// ICMP errors (refused datagrams) sent per second, all peers together.
pub(super) const ICMP_ERRORS_PER_SECOND: u32 = 100;

impl DataPlane {
    pub(super) fn send_datagram(&mut self, to: SocketAddr, datagram: Vec<u8>) {
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
        if self.outbox_bytes.saturating_add(datagram.len()) <= OUTBOX_BYTES {
            if self.outbox.is_empty() {
                tracing::debug!("the WireGuard socket's send buffer is full; queueing");
            }
            self.outbox_bytes = self.outbox_bytes.saturating_add(datagram.len());
            self.outbox.push_back((to, datagram));
        } else {
            self.metrics
                .dropped
                .with_label_values(&["send_buffer_full"])
                .inc();
        }
    }

    pub(super) fn flush_outbox(&mut self) {
        while let Some((to, datagram)) = self.outbox.front() {
            match self.wireguard.send_to(datagram, *to) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) => tracing::debug!(%to, %error, "sending a WireGuard datagram failed"),
                Ok(_) => {}
            }
            if let Some((_, sent)) = self.outbox.pop_front() {
                self.outbox_bytes = self.outbox_bytes.saturating_sub(sent.len());
            }
        }
    }

    /// Reads up to this turn's share of datagrams — data into its peer's queue, anything
    /// else (handshakes, cookies, strangers) handled at once — then decrypts up to this
    /// turn's share from the queues, one peer after another. `wireguard_pending` says
    /// whether the socket has more.
    pub(super) fn receive_datagrams(&mut self) {
        let mut datagram = std::mem::take(&mut self.buffer);
        if self.wireguard_pending {
            for _ in 0..READS_PER_TURN {
                let (length, from) = match self.wireguard.recv_from(&mut datagram) {
                    Ok(received) => received,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        self.wireguard_pending = false;
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "receiving on the WireGuard socket failed");
                        self.wireguard_pending = false;
                        break;
                    }
                };
                let received = &datagram[..length];
                match self.endpoint.data_peer(received) {
                    Some(peer) => {
                        if !self.inbox.push(peer, from, received.to_vec()) {
                            self.metrics
                                .dropped
                                .with_label_values(&["peer_queue_full"])
                                .inc();
                        }
                    }
                    None => self.handle_datagram(from, received),
                }
            }
        }
        self.buffer = datagram;
        for _ in 0..DECRYPTS_PER_TURN {
            let Some((from, data)) = self.inbox.pop() else {
                break;
            };
            self.handle_datagram(from, &data);
        }
    }

    /// One datagram through the WireGuard endpoint: replies sent, packets routed, counted.
    fn handle_datagram(&mut self, from: SocketAddr, datagram: &[u8]) {
        let is_initiation = datagram.first() == Some(&1) && datagram.len() == 148;
        let handled = self.endpoint.handle_datagram(from, datagram);
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
        for (peer, packet) in handled.packets {
            self.route_inbound(peer, packet);
        }
    }

    /// A decrypted packet from `peer` (its source already checked against its ranges).
    fn route_inbound(&mut self, peer: PeerId, packet: Vec<u8>) {
        match packet::classify(&packet) {
            Inbound::Echo { reply } => self.send_to_peer(&reply),
            Inbound::Udp {
                source,
                destination,
                payload,
            } => {
                let payload = payload.to_vec();
                self.relay_udp(
                    peer,
                    (Protocol::Udp, source, destination),
                    &payload,
                    &packet,
                );
            }
            Inbound::Tcp {
                source,
                destination,
                opens,
            } => {
                let tuple = (Protocol::Tcp, source, destination);
                match self.tuples.get(&tuple).copied() {
                    Some(token) => {
                        let Some(flow) = self.flows.get_mut(&token) else {
                            return;
                        };
                        flow.last_heard = self.now;
                        // A retransmitted SYN while the dial is under way: the held one
                        // stands.
                        if !matches!(flow.kind, FlowKind::Dial(_)) {
                            self.queues.inbound.push_back(packet);
                        }
                    }
                    None if opens => self.dial(peer, tuple, packet),
                    // No flow: the stack answers with a reset.
                    None => self.queues.inbound.push_back(packet),
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
    pub(super) fn send_to_peer(&mut self, packet: &[u8]) {
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

    /// Tells the peer that sent `packet` that it was refused (ICMP "administratively
    /// prohibited"), within the per-second budget of ICMP errors.
    pub(super) fn prohibited(&mut self, packet: &[u8]) {
        if self.icmp_budget == 0 {
            return;
        }
        if let Some(error) = packet::prohibited(packet) {
            self.icmp_budget -= 1;
            self.send_to_peer(&error);
        }
    }
}
