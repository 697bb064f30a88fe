//! The flow table of one worker: every forwarded flow by token and by tuple, the peer it
//! belongs to, and what it holds of the bounds all workers share (`policy::Ledger`).
//!
//! The rules about flows live here. A flow belongs to a peer, not to an address: a packet
//! of another peer never reaches it, and a flow whose address changed hands (or left the
//! table) ends. What a flow holds is admitted against its peer's limits and share and given
//! back when it leaves the table. When the share shrinks (more peers), a peer over it gives
//! back its least recently active flows. Pure but for the ledger's lock: what a flow is
//! (its sockets) is the data plane's, a type parameter here.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use mio::Token;

use crate::policy::{Holding, Ledger, LimitHit, Share};

/// A peer, as flows are accounted to it: its client's name.
pub(super) type PeerId = String;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// A flow as the peer's packets name it: (protocol, peer side, cluster side).
pub(super) type Tuple = (Protocol, SocketAddr, SocketAddr);

/// One forwarded flow: whose it is, what it holds, and what it is now (`K`).
pub(super) struct Flow<K> {
    pub peer: PeerId,
    pub holding: Holding,
    pub tuple: Tuple,
    pub opened: Instant,
    /// The last packet of this flow from the peer (UDP: in either direction).
    pub last_heard: Instant,
    /// The last time payload moved, in either direction (keep-alives do not count).
    pub last_active: Instant,
    pub kind: K,
}

/// What a packet's tuple finds in the table, given the peer that sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lookup {
    /// The sender's own flow.
    Own(Token),
    /// A flow of another peer under the same tuple (the address changed hands): never the
    /// sender's to use.
    Foreign(Token),
    Missing,
}

pub(super) struct FlowTable<K> {
    flows: HashMap<Token, Flow<K>>,
    tuples: HashMap<Tuple, Token>,
    /// Shared by all workers: the global limits and shares hold across them.
    ledger: Arc<Mutex<Ledger<PeerId>>>,
    first_token: usize,
    next_token: usize,
}

impl<K> FlowTable<K> {
    /// An empty table whose tokens start at `first_token`.
    pub fn new(ledger: Arc<Mutex<Ledger<PeerId>>>, first_token: usize) -> Self {
        Self {
            flows: HashMap::new(),
            tuples: HashMap::new(),
            ledger,
            first_token,
            next_token: first_token,
        }
    }

    /// The bounds all workers share.
    pub fn ledger(&self) -> MutexGuard<'_, Ledger<PeerId>> {
        // A worker that panicked holding it left counts that are still counts.
        self.ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A token for a new flow (tokens wrap back to the first; a flow lives far shorter
    /// than it takes to hand out every one).
    pub fn token(&mut self) -> Token {
        let token = Token(self.next_token);
        self.next_token = self.next_token.checked_add(1).unwrap_or(self.first_token);
        token
    }

    /// Records `holding` for `peer` if its limits, its share and the global bounds allow
    /// it; `insert` the flow then, or `release` it if the flow could not be opened.
    pub fn admit(&self, peer: &PeerId, holding: Holding) -> Result<(), LimitHit> {
        self.ledger().admit(peer, holding)
    }

    /// Gives back what `admit` recorded for a flow that never made it into the table.
    pub fn release(&self, peer: &PeerId, holding: Holding) {
        self.ledger().release(peer, holding);
    }

    /// Records an admitted flow under `token`.
    pub fn insert(
        &mut self,
        token: Token,
        peer: PeerId,
        holding: Holding,
        tuple: Tuple,
        kind: K,
        now: Instant,
    ) {
        self.tuples.insert(tuple, token);
        self.flows.insert(
            token,
            Flow {
                peer,
                holding,
                tuple,
                opened: now,
                last_heard: now,
                last_active: now,
                kind,
            },
        );
    }

    /// Takes a flow out of the table and gives back what it held; the caller closes it.
    pub fn remove(&mut self, token: Token) -> Option<Flow<K>> {
        let flow = self.flows.remove(&token)?;
        if self.tuples.get(&flow.tuple) == Some(&token) {
            self.tuples.remove(&flow.tuple);
        }
        self.release(&flow.peer, flow.holding);
        Some(flow)
    }

    /// A TCP flow's dial finished: it keeps its buffers, its pending dial is no more.
    pub fn dialed(&mut self, token: Token) {
        let Some(flow) = self.flows.get_mut(&token) else {
            return;
        };
        if let Holding::Tcp {
            dialing: true,
            buffer_bytes,
        } = flow.holding
        {
            flow.holding = Holding::Tcp {
                dialing: false,
                buffer_bytes,
            };
            self.ledger
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .dialed(&flow.peer);
        }
    }

    /// Turns a flow into another kind of flow (a dial into a connection), in place.
    pub fn change_kind(&mut self, token: Token, change: impl FnOnce(K) -> K) {
        if let Some(mut flow) = self.flows.remove(&token) {
            flow.kind = change(flow.kind);
            self.flows.insert(token, flow);
        }
    }

    /// The flow a packet of `peer` with this tuple belongs to.
    pub fn lookup(&self, tuple: &Tuple, peer: &str) -> Lookup {
        match self.tuples.get(tuple) {
            Some(token) => match self.flows.get(token) {
                Some(flow) if flow.peer == peer => Lookup::Own(*token),
                Some(_) => Lookup::Foreign(*token),
                None => Lookup::Missing,
            },
            None => Lookup::Missing,
        }
    }

    pub fn get(&self, token: Token) -> Option<&Flow<K>> {
        self.flows.get(&token)
    }

    pub fn get_mut(&mut self, token: Token) -> Option<&mut Flow<K>> {
        self.flows.get_mut(&token)
    }

    pub fn contains(&self, token: Token) -> bool {
        self.flows.contains_key(&token)
    }

    pub fn iter(&self) -> impl Iterator<Item = (Token, &Flow<K>)> {
        self.flows.iter().map(|(token, flow)| (*token, flow))
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Flow<K>> {
        self.flows.values_mut()
    }

    /// Flows whose peer no longer holds their address (`owner_of` names who does now, if
    /// anyone): they end, so that a peer that takes an address over never inherits the
    /// flows of the one that had it.
    pub fn with_another_owner(&self, owner_of: impl Fn(IpAddr) -> Option<PeerId>) -> Vec<Token> {
        self.flows
            .iter()
            .filter(|(_, flow)| owner_of(flow.tuple.1.ip()).as_deref() != Some(&flow.peer))
            .map(|(token, _)| *token)
            .collect()
    }

    /// Flows to end so that each of this table's peers holds no more than its share (after
    /// the share shrank): of a peer over it, its least recently active flows first.
    pub fn over_share(&self) -> Vec<Token> {
        let ledger = self.ledger();
        let mut by_peer: HashMap<&str, Vec<(Token, &Flow<K>)>> = HashMap::new();
        for (token, flow) in &self.flows {
            by_peer.entry(&flow.peer).or_default().push((*token, flow));
        }
        let mut ending = Vec::new();
        for (peer, mut flows) in by_peer {
            let mut excess = ledger.excess(&peer.to_string());
            if excess == Share::default() {
                continue;
            }
            flows.sort_by_key(|(token, flow)| (flow.last_active, token.0));
            for (token, flow) in flows {
                if excess == Share::default() {
                    break;
                }
                let bytes = match flow.holding {
                    Holding::Tcp { buffer_bytes, .. } => buffer_bytes,
                    Holding::Udp => 0,
                };
                excess.flows = excess.flows.saturating_sub(1);
                excess.buffer_bytes = excess.buffer_bytes.saturating_sub(bytes);
                ending.push(token);
            }
        }
        ending
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::{GlobalLimits, PeerLimits};

    const TCP: Holding = Holding::Tcp {
        dialing: false,
        buffer_bytes: 100,
    };

    fn table(global_flows: usize, global_bytes: usize) -> FlowTable<&'static str> {
        let ledger = Ledger::new(
            PeerLimits {
                tcp_flows: 1_000,
                dials: 1_000,
                udp_flows: 1_000,
                buffer_bytes: 1 << 30,
            },
            GlobalLimits {
                flows: global_flows,
                buffer_bytes: global_bytes,
                share_floor: Share {
                    flows: 1,
                    buffer_bytes: 100,
                },
            },
        );
        FlowTable::new(Arc::new(Mutex::new(ledger)), 10)
    }

    fn tuple(source: &str, port: u16) -> Tuple {
        (
            Protocol::Tcp,
            SocketAddr::new(source.parse().unwrap(), port),
            "10.77.0.1:80".parse().unwrap(),
        )
    }

    /// Admits and inserts a flow of `peer`; its token.
    fn open(
        table: &mut FlowTable<&'static str>,
        peer: &str,
        tuple: Tuple,
        holding: Holding,
        now: Instant,
    ) -> Option<Token> {
        table.admit(&peer.to_string(), holding).ok()?;
        let token = table.token();
        table.insert(token, peer.into(), holding, tuple, "flow", now);
        Some(token)
    }

    #[test]
    fn a_flow_belongs_to_its_peer_and_ends_when_its_address_changes_hands() {
        let mut table = table(100, 10_000);
        let now = Instant::now();
        let flow = tuple("192.168.96.2", 40_000);
        let token = open(&mut table, "a", flow, TCP, now).expect("admitted");
        assert_eq!(table.lookup(&flow, "a"), Lookup::Own(token));
        // Another peer's packet under the same tuple never reaches a's flow.
        assert_eq!(table.lookup(&flow, "b"), Lookup::Foreign(token));
        assert_eq!(
            table.lookup(&tuple("192.168.96.2", 40_001), "a"),
            Lookup::Missing
        );
        // a still holds the address: the flow stays; b took it over, or nobody holds it: it
        // ends.
        assert!(table.with_another_owner(|_| Some("a".into())).is_empty());
        assert_eq!(table.with_another_owner(|_| Some("b".into())), [token]);
        assert_eq!(table.with_another_owner(|_| None), [token]);
        // Removed, it gives back what it held.
        assert!(table.remove(token).is_some());
        assert_eq!(table.ledger().total(), crate::policy::Usage::default());
        assert_eq!(table.lookup(&flow, "a"), Lookup::Missing);
    }

    #[test]
    fn greedy_peers_hold_their_share_another_connects_and_a_shrunk_share_is_given_back() {
        // 12 flows' worth of buffers among 3 peers: 4 each.
        let mut table = table(100, 1_200);
        table.ledger().set_peers(3);
        let start = Instant::now();
        let mut opened = Vec::new();
        for (index, peer) in ["a", "b"].into_iter().enumerate() {
            for port in 0..10u16 {
                let at = start + Duration::from_secs(u64::from(port));
                let source = format!("192.168.96.{}", index + 2);
                if let Some(token) = open(&mut table, peer, tuple(&source, port), TCP, at) {
                    opened.push((peer, port, token));
                }
            }
        }
        assert_eq!(opened.len(), 8, "two greedy peers, four flows each");
        assert!(open(&mut table, "c", tuple("192.168.96.4", 1), TCP, start).is_some());
        // Four peers now: 3 flows each; a and b give back their least recently active flow.
        table.ledger().set_peers(4);
        if let Some(flow) = table.get_mut(opened[0].2) {
            flow.last_active = start + Duration::from_secs(60);
        }
        let mut ending = table.over_share();
        ending.sort();
        let mut expected = vec![opened[1].2, opened[4].2];
        expected.sort();
        assert_eq!(
            ending, expected,
            "a's port 1 (port 0 was active since), b's port 0"
        );
        for token in ending {
            table.remove(token);
        }
        assert!(open(&mut table, "d", tuple("192.168.96.5", 1), TCP, start).is_some());
    }
}
