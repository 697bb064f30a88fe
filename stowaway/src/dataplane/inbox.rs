//! Datagrams read from the WireGuard socket but not yet decrypted, one bounded queue per
//! peer, taken round-robin: a peer flooding the socket fills only its own queue (the excess
//! is dropped before any cryptography) while every other peer's datagrams are decrypted in
//! their turn. Pure: no I/O.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

pub(super) struct Inbox<P> {
    queues: HashMap<P, VecDeque<(SocketAddr, Vec<u8>)>>,
    /// Peers with datagrams waiting, in the order they are served.
    order: VecDeque<P>,
    per_peer: usize,
    total: usize,
    len: usize,
}

impl<P: std::hash::Hash + Eq + Copy> Inbox<P> {
    /// At most `per_peer` datagrams wait for one peer and `total` for all.
    pub fn new(per_peer: usize, total: usize) -> Self {
        Self {
            queues: HashMap::new(),
            order: VecDeque::new(),
            per_peer,
            total,
            len: 0,
        }
    }

    /// Queues a datagram for `peer`; `false` (dropped) when its queue or the inbox is full.
    pub fn push(&mut self, peer: P, from: SocketAddr, datagram: Vec<u8>) -> bool {
        if self.len >= self.total {
            return false;
        }
        let queue = self.queues.entry(peer).or_default();
        if queue.len() >= self.per_peer {
            return false;
        }
        if queue.is_empty() {
            self.order.push_back(peer);
        }
        queue.push_back((from, datagram));
        self.len += 1;
        true
    }

    /// The next datagram, one peer after another.
    pub fn pop(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        let peer = self.order.pop_front()?;
        let queue = self.queues.get_mut(&peer)?;
        let next = queue.pop_front();
        if queue.is_empty() {
            self.queues.remove(&peer);
        } else {
            self.order.push_back(peer);
        }
        if next.is_some() {
            self.len -= 1;
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

    #[test]
    fn a_flooding_peer_fills_only_its_own_queue_and_peers_take_turns() {
        let mut inbox = Inbox::new(3, 100);
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
        let mut inbox = Inbox::new(10, 4);
        for peer in 0..8u32 {
            assert_eq!(inbox.push(peer, from(), vec![0]), peer < 4);
        }
        assert!(inbox.pop().is_some());
        assert!(inbox.push(9, from(), vec![0]));
    }
}
