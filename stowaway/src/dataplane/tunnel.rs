//! The WireGuard socket: datagrams in (decrypted and routed to flows), datagrams out
//! (through a byte-bounded outbox), and the few packets Stowaway answers with itself.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use mio::net::UdpSocket;
use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};

use super::flows::{Lookup, PeerId, Protocol};
use super::inbox::Bound;
use super::outbox::Transmit;
use super::reader::Reader;
use super::{DataPlane, FlowKind, Handoff};
use crate::endpoint::DropReason;
use gefyra_netstack::packet::{self, Inbound};

/// Datagrams read from the WireGuard socket in one turn of the event loop.
const READS_PER_TURN: usize = 512;
/// Datagrams decrypted in one turn, taken from the peers' queues in turn, before the flows
/// get theirs: a peer flooding the socket cannot keep the loop from the others.
const DECRYPTS_PER_TURN: usize = 256;
/// Data datagrams one peer may have waiting for decryption (beyond: dropped, counted as
/// `peer_queue_full`), and all peers together: a count and bytes (256 full-size tunnel
/// datagrams are about 370 KiB; a sender's 64 KiB datagrams are held to the bytes).
pub(super) const PEER_INBOX: Bound = Bound {
    datagrams: 256,
    bytes: 1 << 20,
};
pub(super) const INBOX: Bound = Bound {
    datagrams: 8_192,
    bytes: 16 << 20,
};
/// Bytes of datagrams waiting for room in the WireGuard socket's send buffer, all peers
/// together (beyond: dropped and counted).
pub(super) const OUTBOX_BYTES: usize = 16 << 20;
/// Bytes queued in a turn before the outbox is sent without waiting for the turn's end.
const FLUSH_AT: usize = 256 << 10;
/// Segmented sends refused in a row before segmentation stops for good.
const SEGMENTATION_FAILURES: u32 = 3;
/// ICMP errors (refused datagrams) sent per second, all peers together.
pub(super) const ICMP_ERRORS_PER_SECOND: u32 = 100;

impl DataPlane {
    /// Queues a datagram for the WireGuard socket (sent at the end of this turn, or at once
    /// when a transmit's worth waits); over the outbox's bound it is dropped and counted.
    pub(super) fn send_datagram(&mut self, to: SocketAddr, datagram: &[u8]) {
        let queued = self.outbox.push(to, datagram);
        self.after_queueing(queued);
    }

    /// Counts a datagram the outbox had no room for; sends once a transmit's worth waits.
    fn after_queueing(&mut self, queued: bool) {
        if !queued {
            self.metrics
                .dropped
                .with_label_values(&["send_buffer_full"])
                .inc();
        }
        if self.outbox.bytes() >= FLUSH_AT {
            self.flush_outbox();
        }
    }

    /// Sends what the outbox holds until the socket's send buffer is full (the rest waits
    /// for it to be writable). A transmit of several datagrams goes out as one system call,
    /// cut by the kernel (UDP GSO); one the kernel refuses to cut is sent datagram by
    /// datagram, and after `SEGMENTATION_FAILURES` refusals in a row segmentation stops.
    pub(super) fn flush_outbox(&mut self) {
        while let Some(transmit) = self.outbox.front() {
            let segmented = transmit.datagrams() > 1;
            let sent = if segmented {
                send_segmented(&self.wireguard, transmit)
            } else {
                self.wireguard
                    .send_to(&transmit.contents, transmit.to)
                    .map(drop)
            };
            match sent {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    if !self.outbox_full {
                        tracing::debug!("the WireGuard socket's send buffer is full; queueing");
                        self.outbox_full = true;
                    }
                    return;
                }
                Err(error) if segmented => {
                    self.segmentation_failures = self.segmentation_failures.saturating_add(1);
                    if self.segmentation_failures >= SEGMENTATION_FAILURES {
                        tracing::warn!(%error, "the kernel refuses UDP segmentation offload on the WireGuard socket; sending datagram by datagram from now on");
                        self.outbox.stop_segmenting();
                    } else {
                        tracing::debug!(%error, "a segmented send was refused; sending its datagrams one by one");
                    }
                    self.outbox.split_front();
                    continue;
                }
                Err(error) => {
                    tracing::debug!(to = %transmit.to, %error, "sending a WireGuard datagram failed");
                }
                Ok(()) if segmented => self.segmentation_failures = 0,
                Ok(()) => {}
            }
            self.outbox.pop_front();
        }
        self.outbox_full = false;
    }

    /// Reads up to this turn's share of datagrams — data into its peer's queue, anything
    /// else (handshakes, cookies, strangers) handled at once — then decrypts up to this
    /// turn's share from the queues, one peer after another. `wireguard_pending` says
    /// whether the socket has more.
    pub(super) fn receive_datagrams(&mut self, reader: &mut Reader) {
        if self.wireguard_pending {
            let mut read = 0;
            while read < READS_PER_TURN {
                match reader.read(&self.wireguard) {
                    Ok(count) => read += count.max(1),
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        self.wireguard_pending = false;
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "receiving on the WireGuard socket failed");
                        self.wireguard_pending = false;
                        break;
                    }
                }
                for (from, received) in reader.datagrams() {
                    // Named for another worker (the kernel did not steer it): theirs.
                    if let Some(worker) = self.other_worker_of(received) {
                        self.hand_over(worker, Handoff::Datagram(from, received.to_vec()));
                        continue;
                    }
                    match self.endpoint.data_peer(received) {
                        Some(peer) => {
                            if !self.inbox.push(peer, from, received.to_vec()) {
                                self.metrics
                                    .dropped
                                    .with_label_values(&["peer_queue_full"])
                                    .inc();
                            }
                        }
                        None => self.handle_datagram(from, received, false),
                    }
                }
            }
        }
        for _ in 0..DECRYPTS_PER_TURN {
            let Some((from, data)) = self.inbox.pop() else {
                break;
            };
            self.handle_datagram(from, &data, false);
        }
    }

    /// The other worker a datagram names by its receiver index, if it names one.
    fn other_worker_of(&self, datagram: &[u8]) -> Option<usize> {
        crate::shard::worker_of_datagram(datagram, self.shard.count())
            .filter(|worker| *worker != self.shard.id())
    }

    /// Queues a handoff for another worker and wakes it; over its bound it is dropped and
    /// counted (a flood reaching the wrong worker cannot grow memory).
    pub(super) fn hand_over(&mut self, worker: usize, handoff: Handoff) {
        let Some(link) = self.workers.get(worker) else {
            return;
        };
        let (kind, bytes) = match &handoff {
            Handoff::Datagram(_, datagram) => ("datagram", datagram.len()),
            Handoff::Forward { .. } => ("forward", 0),
        };
        let queued = link.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        let sent = if queued.saturating_add(bytes) > super::HANDOFF_BYTES {
            Err(std::sync::mpsc::TrySendError::Full(handoff))
        } else {
            link.handoffs.try_send(handoff)
        };
        match sent {
            Ok(()) => {
                self.metrics.handoffs.with_label_values(&[kind]).inc();
                let _ = link.waker.wake();
            }
            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                link.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                self.metrics
                    .dropped
                    .with_label_values(&["handoff_queue_full"])
                    .inc();
            }
            // That worker has stopped: so is the data plane.
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                link.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            }
        }
    }

    /// What other workers handed this one: datagrams of its peers (data queued for
    /// decryption in its turn, the rest handled now) and forwarded connections.
    pub(super) fn take_handoffs(&mut self) {
        while let Ok(handoff) = self.handoffs.try_recv() {
            if let (Handoff::Datagram(_, datagram), Some(own)) =
                (&handoff, self.workers.get(self.shard.id()))
            {
                own.queued_bytes
                    .fetch_sub(datagram.len(), Ordering::Relaxed);
            }
            match handoff {
                Handoff::Datagram(from, datagram) => match self.endpoint.data_peer(&datagram) {
                    Some(peer) => {
                        if !self.inbox.push(peer, from, datagram) {
                            self.metrics
                                .dropped
                                .with_label_values(&["peer_queue_full"])
                                .inc();
                        }
                    }
                    None => self.handle_datagram(from, &datagram, true),
                },
                Handoff::Forward {
                    stream,
                    target,
                    from,
                    bridged,
                } => self.forward_here(stream, target, from, bridged),
            }
        }
    }

    /// One datagram through the WireGuard endpoint: replies sent, packets routed, counted;
    /// one for another worker's peer handed over (unless it was `handed_over` already).
    fn handle_datagram(&mut self, from: SocketAddr, datagram: &[u8], handed_over: bool) {
        let is_initiation = datagram.first() == Some(&1) && datagram.len() == 148;
        let handled = self.endpoint.handle_datagram(from, datagram);
        if let Some(worker) = handled.elsewhere {
            if handed_over || worker == self.shard.id() {
                // Workers agree on owners; this cannot bounce, and is not let to.
                self.metrics.dropped.with_label_values(&["misrouted"]).inc();
            } else {
                self.hand_over(worker, Handoff::Datagram(from, datagram.to_vec()));
            }
            return;
        }
        if is_initiation {
            let result = match (&handled.handshake_with, handled.dropped) {
                (Some(_), _) => "completed",
                (None, Some(DropReason::UnknownPeer)) => "unknown_peer",
                (None, Some(_)) => "rejected",
                (None, None) if !handled.replies.is_empty() => "cookie_required",
                (None, None) => "rejected",
            };
            self.metrics.handshakes.with_label_values(&[result]).inc();
        }
        if let Some(reason) = handled.dropped {
            self.metrics
                .dropped
                .with_label_values(&[reason.as_str()])
                .inc();
        }
        if let Some(client) = &handled.handshake_with {
            tracing::debug!(client, %from, "handshake completed");
        }
        for reply in handled.replies {
            self.send_datagram(from, &reply);
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
                match self.flow_of(&peer, &tuple) {
                    Lookup::Own(token) => {
                        let Some(flow) = self.flows.get_mut(token) else {
                            return;
                        };
                        flow.last_heard = self.now;
                        // A retransmitted SYN while the dial is under way: the held one
                        // stands.
                        if !matches!(flow.kind, FlowKind::Dial(_)) {
                            self.queues.inbound.push_back(packet);
                        }
                    }
                    Lookup::Foreign(_) => {}
                    Lookup::Missing if opens => self.dial(peer, tuple, packet),
                    // No flow: the stack answers with a reset.
                    Lookup::Missing => self.queues.inbound.push_back(packet),
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
        let Some((to, datagram)) = self.endpoint.encapsulate(destination, packet) else {
            tracing::debug!(%destination, "no peer holds the destination");
            self.metrics.dropped.with_label_values(&["no_route"]).inc();
            return;
        };
        let queued = self.outbox.push(to, datagram);
        self.after_queueing(queued);
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

/// One `sendmsg` of a transmit's datagrams, cut by the kernel every `segment` bytes.
fn send_segmented(socket: &UdpSocket, transmit: &Transmit) -> io::Result<()> {
    let segment = u16::try_from(transmit.segment)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment over 64 KiB"))?;
    let to = SockaddrStorage::from(transmit.to);
    sendmsg(
        socket.as_raw_fd(),
        &[IoSlice::new(&transmit.contents)],
        &[ControlMessage::UdpGsoSegments(&segment)],
        MsgFlags::empty(),
        Some(&to),
    )
    .map(drop)
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::{DataPlane, HANDOFF_BYTES, Handoff, Shared};
    use crate::metrics::Metrics;

    /// Datagrams of up to 64 KiB handed to another worker wait within a byte bound, not
    /// only a count (4,096 of them would be 256 MiB); the excess is dropped and counted.
    #[test]
    fn what_one_worker_hands_another_waits_within_a_byte_bound() {
        let metrics = Arc::new(Metrics::default());
        let (mut planes, _handle) = DataPlane::bind(
            super::super::tcp::tests::config(300, 10),
            [1; 32],
            2,
            Arc::new(Shared::new(2)),
            metrics.clone(),
        )
        .expect("two workers");
        let from = "198.51.100.7:51820".parse().unwrap();
        let mut datagram = vec![0u8; 65_507];
        datagram[0] = 4;
        datagram[5] = 1;
        for _ in 0..200 {
            planes[0].hand_over(1, Handoff::Datagram(from, datagram.clone()));
        }
        let fits = HANDOFF_BYTES / datagram.len();
        let dropped = metrics
            .dropped
            .with_label_values(&["handoff_queue_full"])
            .get();
        assert_eq!(dropped, 200 - fits as u64);
        // Taken by their worker, they make room again.
        planes[1].take_handoffs();
        planes[0].hand_over(1, Handoff::Datagram(from, datagram));
        let dropped_after = metrics
            .dropped
            .with_label_values(&["handoff_queue_full"])
            .get();
        assert_eq!(dropped_after, dropped);
    }
}
