//! Datagrams read from the WireGuard socket but not yet decrypted, one bounded queue per
//! peer, taken round-robin: a peer flooding the socket fills only its own queue (the excess
//! is dropped before any cryptography) while every other peer's datagrams are decrypted in
//! their turn. Every bound counts datagrams and bytes (a datagram may be 64 KiB: a count
//! alone would let one peer park 16 MiB, and all of them 512 MiB). Pure: no I/O.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

/// How much may wait: datagrams and their bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Bound {
    pub datagrams: usize,
    pub bytes: usize,
}

#[derive(Default)]
struct Queue {
    datagrams: VecDeque<(SocketAddr, Vec<u8>)>,
    bytes: usize,
}

pub(super) struct Inbox<P> {
    queues: HashMap<P, Queue>,
    /// Peers with datagrams waiting, in the order they are served.
    order: VecDeque<P>,
    per_peer: Bound,
    total: Bound,
    len: usize,
    bytes: usize,
}

impl<P: std::hash::Hash + Eq + Copy> Inbox<P> {
    /// At most `per_peer` waits for one peer and `total` for all.
    pub fn new(per_peer: Bound, total: Bound) -> Self {
        Self {
            queues: HashMap::new(),
            order: VecDeque::new(),
            per_peer,
            total,
            len: 0,
            bytes: 0,
        }
    }

    /// Queues a datagram for `peer`; `false` (dropped) when its queue or the inbox is full.
    pub fn push(&mut self, peer: P, from: SocketAddr, datagram: Vec<u8>) -> bool {
        let size = datagram.len();
        if self.len >= self.total.datagrams || self.bytes.saturating_add(size) > self.total.bytes {
            return false;
        }
        let queue = self.queues.entry(peer).or_default();
        if queue.datagrams.len() >= self.per_peer.datagrams
            || queue.bytes.saturating_add(size) > self.per_peer.bytes
        {
            if queue.datagrams.is_empty() {
                self.queues.remove(&peer);
            }
            return false;
        }
        if queue.datagrams.is_empty() {
            self.order.push_back(peer);
        }
        queue.datagrams.push_back((from, datagram));
        queue.bytes += size;
        self.len += 1;
        self.bytes += size;
        true
    }

    /// The next datagram, one peer after another.
    pub fn pop(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        let peer = self.order.pop_front()?;
        let queue = self.queues.get_mut(&peer)?;
        let next = queue.datagrams.pop_front();
        if let Some((_, datagram)) = &next {
            queue.bytes -= datagram.len();
            self.len -= 1;
            self.bytes -= datagram.len();
        }
        if queue.datagrams.is_empty() {
            self.queues.remove(&peer);
        } else {
            self.order.push_back(peer);
        }
        next
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from() -> SocketAddr {
        "198.51.100.7:51820".parse().unwrap()
    }

    const ROOMY: Bound = Bound {
        datagrams: 100,
        bytes: 1 << 20,
    };

    fn datagrams(datagrams: usize) -> Bound {
        Bound {
            datagrams,
            bytes: 1 << 20,
        }
    }

    #[test]
    fn a_flooding_peer_fills_only_its_own_queue_and_peers_take_turns() {
        let mut inbox = Inbox::new(datagrams(3), ROOMY);
        for n in 0..10u8 {
            let queued = inbox.push(1, from(), vec![1, n]);
            assert_eq!(queued, n < 3, "peer 1's datagram {n}");
        }
        assert!(inbox.push(2, from(), vec![2, 0]));
        assert!(inbox.push(2, from(), vec![2, 1]));
        let served: Vec<Vec<u8>> = std::iter::from_fn(|| inbox.pop().map(|(_, d)| d)).collect();
        assert_eq!(
            served,
            [vec![1, 0], vec![2, 0], vec![1, 1], vec![2, 1], vec![1, 2]]
        );
        assert!(inbox.is_empty());
    }

    #[test]
    fn the_inbox_as_a_whole_is_bounded() {
        let mut inbox = Inbox::new(datagrams(10), datagrams(4));
        for peer in 0..8u32 {
            assert_eq!(inbox.push(peer, from(), vec![0]), peer < 4);
        }
        assert!(inbox.pop().is_some());
        assert!(inbox.push(9, from(), vec![0]));
    }

    /// 64 KiB datagrams wait within a byte bound, per peer and in all, not only a count:
    /// what waits is at most the bytes, and taking one makes room again.
    #[test]
    fn large_datagrams_wait_within_a_byte_bound_per_peer_and_in_all() {
        let large = vec![0u8; 65_507];
        let per_peer = Bound {
            datagrams: 256,
            bytes: 200_000,
        };
        let total = Bound {
            datagrams: 8_192,
            bytes: 500_000,
        };
        let mut inbox = Inbox::new(per_peer, total);
        let queued = (0..256)
            .filter(|_| inbox.push(1, from(), large.clone()))
            .count();
        assert_eq!(queued, 200_000 / large.len());
        // Small datagrams of that peer still fit in what is left.
        assert!(inbox.push(1, from(), vec![0; 100]));
        let mut all = queued + 1;
        for peer in 2..20u32 {
            all += (0..256)
                .filter(|_| inbox.push(peer, from(), large.clone()))
                .count();
        }
        assert_eq!(all, 1 + 500_000 / large.len());
        assert!(inbox.pop().is_some());
        assert!(inbox.push(30, from(), large));
    }
}
