//! Datagrams waiting for the WireGuard socket, batched for segmentation offload (UDP GSO):
//! consecutive datagrams to one address, all of one size but the last, travel as one
//! `Transmit` that the kernel cuts into datagrams — one system call for up to
//! `MAX_SEGMENTS` datagrams instead of one each. Bounded in bytes (a burst beyond is
//! dropped and counted by the caller). Pure: no I/O; `tunnel` sends.

use std::collections::VecDeque;
use std::net::SocketAddr;

/// Datagrams in one transmit (the kernel takes up to 64 since Linux 4.18, 128 since 6.2).
pub(super) const MAX_SEGMENTS: usize = 64;
/// Bytes in one transmit: what one UDP datagram may carry over IPv6 (the kernel checks the
/// total against the largest IP packet).
const MAX_TRANSMIT: usize = 65_535 - 40 - 8;

/// Datagrams to one address, cut by the kernel at every `segment` bytes.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Transmit {
    pub to: SocketAddr,
    pub segment: usize,
    pub contents: Vec<u8>,
}

impl Transmit {
    /// How many datagrams this is.
    pub fn datagrams(&self) -> usize {
        self.contents.len().div_ceil(self.segment.max(1))
    }

    /// Whether a datagram of `length` bytes to `to` may join: same address, no longer than
    /// the others, after no shorter one (only the last may be short), within the bounds.
    fn takes(&self, to: SocketAddr, length: usize, max_segments: usize) -> bool {
        self.to == to
            && length <= self.segment
            && self.contents.len().is_multiple_of(self.segment)
            && self.datagrams() < max_segments
            && self.contents.len().saturating_add(length) <= MAX_TRANSMIT
    }
}

pub(super) struct Outbox {
    transmits: VecDeque<Transmit>,
    bytes: usize,
    limit: usize,
    /// Datagrams one transmit may hold: `MAX_SEGMENTS`, or 1 where segmentation failed.
    max_segments: usize,
}

impl Outbox {
    /// An outbox of at most `limit` bytes; `segmentation` off sends datagram by datagram.
    pub fn new(limit: usize, segmentation: bool) -> Self {
        Self {
            transmits: VecDeque::new(),
            bytes: 0,
            limit,
            max_segments: if segmentation { MAX_SEGMENTS } else { 1 },
        }
    }

    /// Queues a datagram; `false` (dropped) when the outbox is full or it is empty.
    pub fn push(&mut self, to: SocketAddr, datagram: &[u8]) -> bool {
        if datagram.is_empty() || self.bytes.saturating_add(datagram.len()) > self.limit {
            return false;
        }
        self.bytes += datagram.len();
        match self.transmits.back_mut() {
            Some(last) if last.takes(to, datagram.len(), self.max_segments) => {
                last.contents.extend_from_slice(datagram);
            }
            _ => self.transmits.push_back(Transmit {
                to,
                segment: datagram.len(),
                contents: datagram.to_vec(),
            }),
        }
        true
    }

    /// The transmit to send next.
    pub fn front(&self) -> Option<&Transmit> {
        self.transmits.front()
    }

    /// The front transmit was sent (or given up).
    pub fn pop_front(&mut self) {
        if let Some(sent) = self.transmits.pop_front() {
            self.bytes = self.bytes.saturating_sub(sent.contents.len());
        }
    }

    /// The kernel refused to cut the front transmit: it goes out datagram by datagram.
    pub fn split_front(&mut self) {
        let Some(front) = self.transmits.pop_front() else {
            return;
        };
        let segment = front.segment.max(1);
        for datagram in front.contents.chunks(segment).rev() {
            self.transmits.push_front(Transmit {
                to: front.to,
                segment,
                contents: datagram.to_vec(),
            });
        }
    }

    /// No more segmentation (the socket's device cannot do it): later pushes go one by one.
    pub fn stop_segmenting(&mut self) {
        self.max_segments = 1;
    }

    pub fn is_empty(&self) -> bool {
        self.transmits.is_empty()
    }

    /// Bytes waiting.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(port: u16) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, 7], port))
    }

    fn sizes(outbox: &mut Outbox) -> Vec<(u16, usize, usize)> {
        let mut seen = Vec::new();
        while let Some(front) = outbox.front() {
            seen.push((front.to.port(), front.segment, front.datagrams()));
            outbox.pop_front();
        }
        seen
    }

    #[test]
    fn datagrams_of_one_size_to_one_address_travel_together_and_only_the_last_may_be_short() {
        let mut outbox = Outbox::new(1 << 20, true);
        for length in [100, 100, 100, 60, 100, 100] {
            assert!(outbox.push(address(1), &vec![7; length]));
        }
        assert!(outbox.push(address(2), &[7; 100]));
        // Longer than the segment: a new transmit.
        assert!(outbox.push(address(2), &[7; 120]));
        assert_eq!(
            sizes(&mut outbox),
            [(1, 100, 4), (1, 100, 2), (2, 100, 1), (2, 120, 1)]
        );
        assert!(outbox.is_empty());
    }

    #[test]
    fn a_transmit_holds_at_most_max_segments_and_64_kib() {
        let mut outbox = Outbox::new(1 << 20, true);
        for _ in 0..MAX_SEGMENTS + 1 {
            outbox.push(address(1), &[0; 10]);
        }
        for _ in 0..50 {
            outbox.push(address(2), &[0; 1_452]);
        }
        let seen = sizes(&mut outbox);
        assert_eq!(seen[..2], [(1, 10, MAX_SEGMENTS), (1, 10, 1)]);
        // 45 datagrams of 1,452 bytes fit in one datagram's worth of IPv6 payload.
        assert_eq!(seen[2..], [(2, 1_452, 45), (2, 1_452, 5)]);
    }

    #[test]
    fn the_outbox_is_bounded_in_bytes_and_frees_what_was_sent() {
        let mut outbox = Outbox::new(250, true);
        assert!(outbox.push(address(1), &[0; 100]));
        assert!(outbox.push(address(1), &[0; 100]));
        assert!(!outbox.push(address(1), &[0; 100]), "over the bound");
        assert!(!outbox.push(address(1), &[]), "nothing to send");
        outbox.pop_front();
        assert!(outbox.push(address(1), &[0; 100]));
    }

    #[test]
    fn a_refused_transmit_is_split_into_its_datagrams_in_order() {
        let mut outbox = Outbox::new(14, true);
        outbox.push(address(1), &[1; 4]);
        outbox.push(address(1), &[2; 4]);
        outbox.push(address(1), &[3; 2]);
        outbox.push(address(2), &[4; 4]);
        outbox.split_front();
        assert!(!outbox.push(address(3), &[0; 1]), "splitting frees nothing");
        let mut contents = Vec::new();
        while let Some(front) = outbox.front() {
            contents.push(front.contents.clone());
            outbox.pop_front();
        }
        assert_eq!(
            contents,
            [vec![1; 4], vec![2; 4], vec![3; 2], vec![4; 4]],
            "the split datagrams go first, in their order"
        );
        assert!(outbox.push(address(1), &[0; 14]), "sending frees the bytes");
    }

    #[test]
    fn without_segmentation_every_datagram_is_its_own_transmit() {
        let mut outbox = Outbox::new(1 << 20, false);
        outbox.push(address(1), &[0; 10]);
        outbox.push(address(1), &[0; 10]);
        assert_eq!(sizes(&mut outbox), [(1, 10, 1), (1, 10, 1)]);
        let mut stopped = Outbox::new(1 << 20, true);
        stopped.push(address(1), &[0; 10]);
        stopped.stop_segmenting();
        stopped.push(address(1), &[0; 10]);
        assert_eq!(sizes(&mut stopped), [(1, 10, 1), (1, 10, 1)]);
    }
}
