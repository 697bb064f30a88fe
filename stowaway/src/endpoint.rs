//! The WireGuard endpoint without I/O: datagrams in, datagrams and IP packets out.
//!
//! One boringtun `Tunn` per peer. Handshake initiations are matched to peers by the
//! initiator's static public key, everything else by our receiver index; one rate limiter
//! is shared by all peers, counts each handshake message once and answers floods with
//! cookie replies. Only a message the peer's tunnel authenticated moves the peer's endpoint
//! (roaming); what a stranger can send (a replayed initiation, anything drawing a cookie
//! reply) never does. Anything that does not parse, authenticate or come from a known peer
//! is dropped and counted — never a panic.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use gefyra_netstack::session::{self, Decapsulated, Timers};

use crate::peers::{self, Key, PeerSpec, Plan};
use crate::shard::{Shard, worker_of_index, worker_of_key};

/// Handshakes per second (all peers together) before cookie replies are required.
const HANDSHAKES_PER_SECOND: u64 = 100;
/// Destinations remembered by `encapsulate` before the cache starts over.
const ROUTE_CACHE: usize = 65_536;
/// Room for any datagram boringtun writes (a full-size packet plus overhead).
const BUFFER: usize = 65_536;

/// Why a datagram or packet was dropped (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Not a WireGuard message, bad MAC, bad size.
    Malformed,
    /// A handshake from a key that is no peer (or a message for an index nobody holds).
    UnknownPeer,
    /// The peer's own tunnel refused it (replay, decryption, expired session).
    Rejected,
    /// Decrypted, but from a source outside the peer's ranges.
    SpoofedSource,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownPeer => "unknown_peer",
            Self::Rejected => "rejected",
            Self::SpoofedSource => "spoofed_source",
        }
    }
}

/// What one datagram produced.
#[derive(Debug, Default)]
pub struct Handled {
    /// Datagrams to send back to where this one came from (handshake responses, cookie
    /// replies, queued data).
    pub replies: Vec<Vec<u8>>,
    /// Decrypted IP packets from the peer, each from one of its own ranges: (client, packet).
    pub packets: Vec<(String, Vec<u8>)>,
    pub dropped: Option<DropReason>,
    /// A handshake with this client completed (a response was sent).
    pub handshake_with: Option<String>,
    /// The datagram is for a peer of this other worker: hand it over untouched.
    pub elsewhere: Option<usize>,
}

/// One peer's counters, as its tunnel keeps them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Time since the last completed handshake (`None`: never).
    pub since_handshake: Option<std::time::Duration>,
    /// Bytes received from the peer and sent to it (WireGuard payload).
    pub received: u64,
    pub sent: u64,
    /// Where the peer was last heard from.
    pub endpoint: Option<SocketAddr>,
}

struct Peer {
    spec: PeerSpec,
    /// The peer's noise state, made on its first handshake (not when it is configured: a
    /// fleet of configured peers that never connect costs a spec each, not a tunnel each).
    tunnel: Option<Box<Tunn>>,
    /// Where the peer was last heard from (it may roam).
    endpoint: Option<SocketAddr>,
}

pub struct Endpoint {
    private: StaticSecret,
    public: PublicKey,
    /// Shared by every worker's endpoint: one rate, one cookie secret. Every handshake
    /// message is counted here, once, before any tunnel sees it.
    limiter: Arc<RateLimiter>,
    /// What each tunnel checks again (the MACs) without counting: a second count would let
    /// a datagram that passed `limiter` draw a cookie reply from the tunnel.
    tunnel_limiter: Arc<RateLimiter>,
    /// The peers this endpoint holds (the others are other workers').
    shard: Shard,
    /// By our index (the upper 24 bits of every receiver index boringtun hands out; random,
    /// its low byte naming this worker).
    peers: HashMap<u32, Peer>,
    by_key: HashMap<Key, u32>,
    /// Destination address → peer index, filled by `encapsulate`, emptied by `apply`.
    routes: HashMap<IpAddr, u32>,
    buffer: Vec<u8>,
}

impl Endpoint {
    pub fn new(private: Key) -> Self {
        Self::with_handshake_rate(private, HANDSHAKES_PER_SECOND)
    }

    /// An endpoint that requires cookies above `handshakes_per_second` (all peers together).
    pub fn with_handshake_rate(private: Key, handshakes_per_second: u64) -> Self {
        let limiter = Self::limiter(private, handshakes_per_second);
        Self::worker(private, limiter, Shard::ALONE)
    }

    /// The handshake rate limiter the endpoints of all workers share (cookies above
    /// `handshakes_per_second`, all peers together).
    pub fn limiter(private: Key, handshakes_per_second: u64) -> Arc<RateLimiter> {
        let public = PublicKey::from(&StaticSecret::from(private));
        Arc::new(RateLimiter::new(&public, handshakes_per_second))
    }

    /// One worker's endpoint: it holds the peers its shard owns, hands out only its own
    /// indices, and names the worker of any other peer's datagram (`Handled::elsewhere`).
    pub fn worker(private: Key, limiter: Arc<RateLimiter>, shard: Shard) -> Self {
        let private = StaticSecret::from(private);
        let public = PublicKey::from(&private);
        Self {
            limiter,
            tunnel_limiter: Arc::new(RateLimiter::new(&public, u64::MAX)),
            shard,
            private,
            public,
            peers: HashMap::new(),
            by_key: HashMap::new(),
            routes: HashMap::new(),
            buffer: vec![0; BUFFER],
        }
    }

    pub fn public_key(&self) -> Key {
        self.public.to_bytes()
    }

    /// The peer table as it is now, by public key.
    pub fn specs(&self) -> BTreeMap<Key, PeerSpec> {
        self.peers
            .values()
            .map(|peer| (peer.spec.public_key, peer.spec.clone()))
            .collect()
    }

    /// The client whose peer's range holds `address`.
    pub fn owner(&self, address: IpAddr) -> Option<String> {
        peers::route(self.peers.values().map(|peer| &peer.spec), address)
            .map(|spec| spec.client.clone())
    }

    /// Applies a plan: added and replaced peers get a fresh tunnel, removed ones lose
    /// theirs at once, updated ones take their new ranges; every other peer (and every
    /// updated one) keeps its session.
    pub fn apply(&mut self, plan: Plan) {
        self.routes.clear();
        for spec in plan.update {
            let peer = self
                .by_key
                .get(&spec.public_key)
                .and_then(|index| self.peers.get_mut(index));
            if let Some(peer) = peer {
                peer.spec = spec;
            }
        }
        for key in plan
            .remove
            .iter()
            .chain(plan.replace.iter().map(|s| &s.public_key))
        {
            if let Some(index) = self.by_key.remove(key) {
                self.peers.remove(&index);
            }
        }
        for spec in plan.add.into_iter().chain(plan.replace) {
            if !self.shard.owns_key(&spec.public_key) {
                continue;
            }
            // A random 24-bit index of this worker not in use (a worker has at least 2^18
            // of them, so a free one is found at once unless the table is that large).
            let mut index = self.shard.index_from(rand::random());
            while self.peers.contains_key(&index) {
                index = self.shard.index_from(rand::random());
            }
            self.by_key.insert(spec.public_key, index);
            self.peers.insert(
                index,
                Peer {
                    spec,
                    tunnel: None,
                    endpoint: None,
                },
            );
        }
    }

    /// The peer (our index) a transport-data datagram is for, if it is one and that peer
    /// exists — read from the header only, before any cryptography, so that the data plane
    /// can give every peer its share of decryption.
    pub fn data_peer(&self, datagram: &[u8]) -> Option<u32> {
        // Type 4 (little-endian u32), receiver index, counter, then at least the 16-byte tag.
        if datagram.len() < 32 || datagram[..4] != [4, 0, 0, 0] {
            return None;
        }
        let receiver = u32::from_le_bytes(datagram[4..8].try_into().ok()?);
        let index = receiver >> 8;
        self.peers.contains_key(&index).then_some(index)
    }

    /// Handles one datagram received from `from`.
    pub fn handle_datagram(&mut self, from: SocketAddr, datagram: &[u8]) -> Handled {
        let mut handled = Handled::default();
        let mut cookie = [0u8; 64];
        let index = match self
            .limiter
            .verify_packet(Some(from.ip()), datagram, &mut cookie)
        {
            Err(TunnResult::WriteToNetwork(reply)) => {
                handled.replies.push(reply.to_vec());
                return handled;
            }
            Err(_) => {
                handled.dropped = Some(DropReason::Malformed);
                return handled;
            }
            Ok(Packet::HandshakeInit(init)) => {
                match parse_handshake_anon(&self.private, &self.public, &init) {
                    Ok(half) if !self.shard.owns_key(&half.peer_static_public) => {
                        handled.elsewhere =
                            Some(worker_of_key(&half.peer_static_public, self.shard.count()));
                        return handled;
                    }
                    Ok(half) => self.by_key.get(&half.peer_static_public).copied(),
                    Err(_) => {
                        handled.dropped = Some(DropReason::Malformed);
                        return handled;
                    }
                }
            }
            Ok(Packet::HandshakeResponse(response)) => Some(response.receiver_idx >> 8),
            Ok(Packet::PacketCookieReply(reply)) => Some(reply.receiver_idx >> 8),
            Ok(Packet::PacketData(data)) => Some(data.receiver_idx >> 8),
        };
        if let Some(worker) = index
            .map(|index| worker_of_index(index, self.shard.count()))
            .filter(|worker| *worker != self.shard.id())
        {
            handled.elsewhere = Some(worker);
            return handled;
        }
        let Some((index, peer)) =
            index.and_then(|index| Some((index, self.peers.get_mut(&index)?)))
        else {
            handled.dropped = Some(DropReason::UnknownPeer);
            return handled;
        };
        let is_init = datagram.first() == Some(&1);
        // Only an initiation (its key already proven by the DH above) makes a tunnel;
        // anything else for a peer that never handshook is refused.
        if peer.tunnel.is_none() && !is_init {
            handled.dropped = Some(DropReason::Rejected);
            return handled;
        }
        let tunnel = peer.tunnel.get_or_insert_with(|| {
            Box::new(Tunn::new(
                self.private.clone(),
                PublicKey::from(peer.spec.public_key),
                Some(peer.spec.preshared_key),
                None,
                index,
                Some(self.tunnel_limiter.clone()),
            ))
        });
        // Only a message the tunnel authenticated moves the peer's endpoint (roaming): an
        // initiation it answered, a response it accepted, data it decrypted. Anything
        // anyone can send (a replayed initiation, a cookie reply) leaves it where it is.
        let kind = datagram.first().copied();
        let spec = &peer.spec;
        let endpoint = &mut peer.endpoint;
        session::decapsulate(
            tunnel,
            Some(from.ip()),
            datagram,
            &mut self.buffer,
            |step| match step {
                // A decrypted keep-alive.
                Decapsulated::KeepAlive => *endpoint = Some(from),
                Decapsulated::Rejected => handled.dropped = Some(DropReason::Rejected),
                Decapsulated::Reply {
                    datagram: reply,
                    first,
                } => {
                    // The tunnel's limiter never asks for cookies: a reply to an initiation
                    // is its response (type 2), to a response the first data; then the
                    // queued packets.
                    let answered_initiation = is_init && reply.first() == Some(&2);
                    if first && (answered_initiation || kind == Some(2)) {
                        *endpoint = Some(from);
                    }
                    if first && answered_initiation {
                        handled.handshake_with = Some(spec.client.clone());
                    }
                    handled.replies.push(reply.to_vec());
                }
                Decapsulated::Packet { source, packet } => {
                    *endpoint = Some(from);
                    deliver(&mut handled, spec, source, packet);
                }
            },
        );
        handled
    }

    /// Encrypts an IP packet for the peer whose range holds `destination`: where to send it
    /// and the datagram (a handshake initiation if the peer has no session yet; the packet
    /// then waits in the peer's queue). `None` when no peer holds the address or the peer
    /// was never heard from. The datagram is written into the endpoint's own buffer (no
    /// allocation per packet): send or copy it before the next call.
    pub fn encapsulate(
        &mut self,
        destination: IpAddr,
        packet: &[u8],
    ) -> Option<(SocketAddr, &[u8])> {
        let index = match self.routes.get(&destination) {
            Some(index) => *index,
            None => {
                let key = peers::route(self.peers.values().map(|p| &p.spec), destination)?;
                let index = *self.by_key.get(&key.public_key)?;
                if self.routes.len() >= ROUTE_CACHE {
                    self.routes.clear();
                }
                self.routes.insert(destination, index);
                index
            }
        };
        let peer = self.peers.get_mut(&index)?;
        let endpoint = peer.endpoint?;
        let datagram = session::encapsulate(peer.tunnel.as_mut()?, packet, &mut self.buffer)?;
        Some((endpoint, datagram))
    }

    /// Every peer's counters, by client.
    pub fn peer_stats(&self) -> BTreeMap<String, PeerStats> {
        self.peers
            .values()
            .map(|peer| {
                let (since_handshake, sent, received) = peer
                    .tunnel
                    .as_ref()
                    .map(|tunnel| {
                        let (since, sent, received, _, _) = tunnel.stats();
                        (since, sent, received)
                    })
                    .unwrap_or_default();
                let stats = PeerStats {
                    since_handshake,
                    received: received as u64,
                    sent: sent as u64,
                    endpoint: peer.endpoint,
                };
                (peer.spec.client.clone(), stats)
            })
            .collect()
    }

    /// Timers (keepalives, rekeying, session expiry) of every peer, and the rate limiter's
    /// one-second window; call once a second. Datagrams to send.
    pub fn tick(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        // The shared limiter's one-second window is kept by the first worker.
        if self.shard.id() == 0 {
            self.limiter.reset_count();
        }
        let mut out = Vec::new();
        for peer in self.peers.values_mut() {
            let Some(tunnel) = peer.tunnel.as_mut() else {
                continue;
            };
            if let (Timers::Send(datagram), Some(endpoint)) =
                (session::timers(tunnel, &mut self.buffer), peer.endpoint)
            {
                out.push((endpoint, datagram.to_vec()));
            }
        }
        out
    }
}

fn deliver(handled: &mut Handled, spec: &PeerSpec, source: IpAddr, packet: &[u8]) {
    if peers::may_send_from(spec, source) {
        handled.packets.push((spec.client.clone(), packet.to_vec()));
    } else {
        handled.dropped = Some(DropReason::SpoofedSource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PSK: Key = [7; 32];

    /// A real boringtun peer (the client side), with its own key.
    fn client_tunnel(client_private: Key, server: Key) -> Tunn {
        Tunn::new(
            StaticSecret::from(client_private),
            PublicKey::from(server),
            Some(PSK),
            None,
            99,
            None,
        )
    }

    fn spec(name: &str, private: Key, ranges: &[&str]) -> PeerSpec {
        PeerSpec {
            client: name.into(),
            public_key: PublicKey::from(&StaticSecret::from(private)).to_bytes(),
            preshared_key: PSK,
            ranges: ranges.iter().map(|r| r.parse().unwrap()).collect(),
        }
    }

    fn ipv4(source: [u8; 4], destination: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut packet = vec![0u8; 20];
        packet[0] = 0x45;
        let length = (20 + payload.len()) as u16;
        packet[2..4].copy_from_slice(&length.to_be_bytes());
        packet[8] = 64;
        packet[9] = 17;
        packet[12..16].copy_from_slice(&source);
        packet[16..20].copy_from_slice(&destination);
        packet.extend_from_slice(payload);
        packet
    }

    const FROM: &str = "198.51.100.7:51820";

    /// Handshake, then one packet from `source`; what the endpoint made of that packet.
    fn send_from(endpoint: &mut Endpoint, client: &mut Tunn, source: [u8; 4]) -> Handled {
        let from: SocketAddr = FROM.parse().unwrap();
        let mut buffer = vec![0u8; BUFFER];
        let packet = ipv4(source, [192, 168, 99, 1], b"hello");
        // No session yet: the packet is queued and an initiation comes out.
        let TunnResult::WriteToNetwork(init) = client.encapsulate(&packet, &mut buffer) else {
            panic!("expected a handshake initiation");
        };
        let handled = endpoint.handle_datagram(from, init);
        assert_eq!(handled.dropped, None);
        let mut out = Vec::new();
        for reply in handled.replies {
            let mut input = reply;
            while let TunnResult::WriteToNetwork(datagram) =
                client.decapsulate(None, &input, &mut buffer)
            {
                out.push(datagram.to_vec());
                input = Vec::new();
            }
        }
        let mut last = Handled::default();
        for datagram in out {
            last = endpoint.handle_datagram(from, &datagram);
            if !last.packets.is_empty() || last.dropped.is_some() {
                break;
            }
        }
        last
    }

    fn endpoint_with(peers: Vec<PeerSpec>) -> Endpoint {
        let mut endpoint = Endpoint::new([1; 32]);
        endpoint.apply(Plan {
            add: peers,
            ..Plan::default()
        });
        endpoint
    }

    #[test]
    fn each_worker_holds_only_its_peers_and_names_the_owner_of_the_others_datagrams() {
        // Client private keys whose public keys land on worker 0 and on worker 1 of two.
        let key_of = |worker: usize| {
            (2u8..=255)
                .map(|byte| [byte; 32])
                .find(|private| {
                    let public = PublicKey::from(&StaticSecret::from(*private)).to_bytes();
                    worker_of_key(&public, 2) == worker
                })
                .expect("a key for each worker")
        };
        let (first, second) = (key_of(0), key_of(1));
        let server = [1; 32];
        let limiter = Endpoint::limiter(server, 100);
        let mut workers: Vec<Endpoint> = (0..2)
            .map(|id| {
                let mut endpoint =
                    Endpoint::worker(server, limiter.clone(), Shard::new(id, 2).expect("a shard"));
                endpoint.apply(Plan {
                    add: vec![
                        spec("first", first, &["192.168.96.2/32"]),
                        spec("second", second, &["192.168.96.3/32"]),
                    ],
                    ..Plan::default()
                });
                endpoint
            })
            .collect();
        assert_eq!(workers[0].specs().len(), 1);
        assert_eq!(
            workers[1].owner("192.168.96.3".parse().unwrap()).as_deref(),
            Some("second")
        );
        assert_eq!(workers[0].owner("192.168.96.3".parse().unwrap()), None);

        // The second client's initiation read by the first worker is named, not answered.
        let public = workers[0].public_key();
        let mut client = client_tunnel(second, public);
        let from: SocketAddr = FROM.parse().unwrap();
        let mut buffer = vec![0u8; BUFFER];
        let packet = ipv4([192, 168, 96, 3], [192, 168, 99, 1], b"hello");
        let TunnResult::WriteToNetwork(init) = client.encapsulate(&packet, &mut buffer) else {
            panic!("expected a handshake initiation");
        };
        let init = init.to_vec();
        let misrouted = workers[0].handle_datagram(from, &init);
        assert_eq!(misrouted.elsewhere, Some(1));
        assert!(misrouted.replies.is_empty() && misrouted.dropped.is_none());

        // Its owner answers; the data that follows names the owner too, and only the
        // owner's indices are on the wire.
        let handled = workers[1].handle_datagram(from, &init);
        assert_eq!(handled.handshake_with.as_deref(), Some("second"));
        let response = handled.replies[0].clone();
        let mut data = Vec::new();
        let mut input = response;
        while let TunnResult::WriteToNetwork(datagram) =
            client.decapsulate(None, &input, &mut buffer)
        {
            data.push(datagram.to_vec());
            input = Vec::new();
        }
        let datagram = data.last().expect("the queued packet");
        assert_eq!(crate::shard::worker_of_datagram(datagram, 2), Some(1));
        assert_eq!(
            workers[0].handle_datagram(from, datagram).elsewhere,
            Some(1)
        );
        let delivered = workers[1].handle_datagram(from, datagram);
        assert_eq!(delivered.packets.len(), 1, "{delivered:?}");
    }

    #[test]
    fn a_peer_handshakes_and_its_packets_come_out_only_from_its_own_ranges() {
        let mut endpoint = endpoint_with(vec![spec(
            "a",
            [2; 32],
            &["192.168.96.2/32", "10.1.0.0/16"],
        )]);
        let server = endpoint.public_key();
        let mut client = client_tunnel([2; 32], server);
        let handled = send_from(&mut endpoint, &mut client, [192, 168, 96, 2]);
        assert_eq!(handled.dropped, None);
        assert_eq!(handled.packets.len(), 1);
        assert_eq!(handled.packets[0].0, "a");
        assert_eq!(&handled.packets[0].1[20..], b"hello");

        let mut client = client_tunnel([2; 32], server);
        let spoofed = send_from(&mut endpoint, &mut client, [192, 168, 96, 3]);
        assert_eq!(spoofed.dropped, Some(DropReason::SpoofedSource));
        assert!(spoofed.packets.is_empty());

        // The reverse direction: a packet for the peer's subnet is encrypted for it.
        let (to, datagram) = endpoint
            .encapsulate(
                "10.1.2.3".parse().unwrap(),
                &ipv4([10, 0, 0, 1], [10, 1, 2, 3], b"back"),
            )
            .expect("routed to a");
        assert_eq!(to, FROM.parse().unwrap());
        let mut buffer = vec![0u8; BUFFER];
        assert!(matches!(
            client.decapsulate(None, datagram, &mut buffer),
            TunnResult::WriteToTunnelV4(_, _)
        ));
        assert!(
            endpoint
                .encapsulate("10.2.0.1".parse().unwrap(), b"x")
                .is_none()
        );
    }

    #[test]
    fn unknown_and_removed_peers_cannot_handshake_and_others_keep_their_session() {
        let mut endpoint = endpoint_with(vec![
            spec("a", [2; 32], &["192.168.96.2/32"]),
            spec("b", [3; 32], &["192.168.96.3/32"]),
        ]);
        let server = endpoint.public_key();
        let mut stranger = client_tunnel([9; 32], server);
        let from: SocketAddr = FROM.parse().unwrap();
        let mut buffer = vec![0u8; BUFFER];
        let TunnResult::WriteToNetwork(init) =
            stranger.format_handshake_initiation(&mut buffer, false)
        else {
            panic!("an initiation");
        };
        assert_eq!(
            endpoint.handle_datagram(from, init).dropped,
            Some(DropReason::UnknownPeer)
        );

        let mut a = client_tunnel([2; 32], server);
        assert_eq!(
            send_from(&mut endpoint, &mut a, [192, 168, 96, 2])
                .packets
                .len(),
            1
        );
        // b leaves; a's session goes on without a new handshake.
        let b_key = spec("b", [3; 32], &[]).public_key;
        endpoint.apply(Plan {
            remove: vec![b_key],
            ..Plan::default()
        });
        let TunnResult::WriteToNetwork(data) = a.encapsulate(
            &ipv4([192, 168, 96, 2], [192, 168, 99, 1], b"again"),
            &mut buffer,
        ) else {
            panic!("a has a session");
        };
        assert_eq!(endpoint.handle_datagram(from, data).packets.len(), 1);
        let mut b = client_tunnel([3; 32], server);
        let TunnResult::WriteToNetwork(init) = b.format_handshake_initiation(&mut buffer, false)
        else {
            panic!("an initiation");
        };
        assert_eq!(
            endpoint.handle_datagram(from, init).dropped,
            Some(DropReason::UnknownPeer)
        );
    }

    #[test]
    fn a_peer_whose_ranges_change_keeps_its_session_and_sends_only_from_the_new_ones() {
        let mut endpoint = endpoint_with(vec![spec("a", [2; 32], &["192.168.96.2/32"])]);
        let server = endpoint.public_key();
        let from: SocketAddr = FROM.parse().unwrap();
        let mut buffer = vec![0u8; BUFFER];
        let mut a = client_tunnel([2; 32], server);
        assert_eq!(
            send_from(&mut endpoint, &mut a, [192, 168, 96, 2])
                .packets
                .len(),
            1
        );
        // The routed subnet arrives (the operator records it after the connect).
        endpoint.apply(Plan {
            update: vec![spec("a", [2; 32], &["192.168.96.2/32", "10.1.0.0/16"])],
            ..Plan::default()
        });
        let TunnResult::WriteToNetwork(data) =
            a.encapsulate(&ipv4([10, 1, 0, 5], [192, 168, 99, 1], b"sub"), &mut buffer)
        else {
            panic!("a still has its session: data, not an initiation");
        };
        assert_eq!(data[0], 4);
        let handled = endpoint.handle_datagram(from, data);
        assert_eq!((handled.dropped, handled.packets.len()), (None, 1));
        assert!(
            endpoint
                .encapsulate("10.1.9.9".parse().unwrap(), b"x")
                .is_some()
        );
        // And it goes away again: the session stays, the subnet is refused.
        endpoint.apply(Plan {
            update: vec![spec("a", [2; 32], &["192.168.96.2/32"])],
            ..Plan::default()
        });
        let TunnResult::WriteToNetwork(data) =
            a.encapsulate(&ipv4([10, 1, 0, 5], [192, 168, 99, 1], b"sub"), &mut buffer)
        else {
            panic!("data");
        };
        assert_eq!(
            endpoint.handle_datagram(from, data).dropped,
            Some(DropReason::SpoofedSource)
        );
        assert!(
            endpoint
                .encapsulate("10.1.9.9".parse().unwrap(), b"x")
                .is_none()
        );
    }

    #[test]
    fn configured_peers_hold_no_tunnel_until_they_handshake() {
        let mut endpoint = endpoint_with(vec![
            spec("a", [2; 32], &["192.168.96.2/32"]),
            spec("b", [3; 32], &["192.168.96.3/32"]),
        ]);
        assert!(endpoint.peers.values().all(|peer| peer.tunnel.is_none()));
        // Data for a peer that never handshook (its index guessed) is refused, not a panic.
        let index = *endpoint.by_key.values().next().unwrap();
        let mut data = vec![4u8, 0, 0, 0];
        data.extend_from_slice(&(index << 8).to_le_bytes());
        data.extend_from_slice(&[0u8; 40]);
        let from: SocketAddr = FROM.parse().unwrap();
        assert_eq!(
            endpoint.handle_datagram(from, &data).dropped,
            Some(DropReason::Rejected)
        );
        assert!(
            endpoint
                .encapsulate("192.168.96.2".parse().unwrap(), b"x")
                .is_none()
        );
        assert_eq!(endpoint.peer_stats()["a"], PeerStats::default());
        let server = endpoint.public_key();
        let mut a = client_tunnel([2; 32], server);
        assert_eq!(
            send_from(&mut endpoint, &mut a, [192, 168, 96, 2])
                .packets
                .len(),
            1
        );
        let with_tunnel: Vec<&str> = endpoint
            .peers
            .values()
            .filter(|peer| peer.tunnel.is_some())
            .map(|peer| peer.spec.client.as_str())
            .collect();
        assert_eq!(with_tunnel, ["a"]);
    }

    /// The victim's initiation and the endpoint's answer, the victim's session then up.
    fn handshake(endpoint: &mut Endpoint, client: &mut Tunn, from: SocketAddr) -> Vec<u8> {
        let mut buffer = vec![0u8; BUFFER];
        let TunnResult::WriteToNetwork(init) =
            client.format_handshake_initiation(&mut buffer, false)
        else {
            panic!("an initiation");
        };
        let init = init.to_vec();
        let handled = endpoint.handle_datagram(from, &init);
        assert_eq!(
            handled.handshake_with.as_deref(),
            Some("victim"),
            "{handled:?}"
        );
        let response = handled.replies[0].clone();
        let _ = client.decapsulate(None, &response, &mut buffer);
        init
    }

    #[test]
    fn each_handshake_counts_once_against_the_rate() {
        // Two handshakes a second: both complete (counted twice, the second would have
        // needed a cookie).
        let mut endpoint = Endpoint::with_handshake_rate([1; 32], 2);
        endpoint.apply(Plan {
            add: vec![spec("victim", [2; 32], &["192.168.96.2/32"])],
            ..Plan::default()
        });
        let from: SocketAddr = FROM.parse().unwrap();
        for _ in 0..2 {
            let mut client = client_tunnel([2; 32], endpoint.public_key());
            handshake(&mut endpoint, &mut client, from);
        }
    }

    #[test]
    fn a_replayed_initiation_at_the_rate_limit_does_not_move_the_peers_endpoint() {
        let mut endpoint = Endpoint::with_handshake_rate([1; 32], 3);
        endpoint.apply(Plan {
            add: vec![spec("victim", [2; 32], &["192.168.96.2/32"])],
            ..Plan::default()
        });
        let victim: SocketAddr = FROM.parse().unwrap();
        let stranger: SocketAddr = "203.0.113.66:4444".parse().unwrap();
        let mut client = client_tunnel([2; 32], endpoint.public_key());
        let init = handshake(&mut endpoint, &mut client, victim);
        // The stranger replays it from its own address until the limiter is at its edge
        // and beyond: cookie replies and refusals, never the victim's endpoint.
        for _ in 0..8 {
            let handled = endpoint.handle_datagram(stranger, &init);
            assert!(handled.handshake_with.is_none(), "{handled:?}");
            assert_eq!(endpoint.peer_stats()["victim"].endpoint, Some(victim));
        }
        // Nor does a cookie reply or garbage data for the victim's index.
        let index = *endpoint.by_key.values().next().unwrap();
        let mut data = vec![4u8, 0, 0, 0];
        data.extend_from_slice(&(index << 8).to_le_bytes());
        data.extend_from_slice(&[0u8; 40]);
        endpoint.handle_datagram(stranger, &data);
        assert_eq!(endpoint.peer_stats()["victim"].endpoint, Some(victim));
        // Authenticated data from a new address is the victim roaming: it moves.
        let roamed: SocketAddr = "198.51.100.8:51820".parse().unwrap();
        let mut buffer = vec![0u8; BUFFER];
        let TunnResult::WriteToNetwork(data) = client.encapsulate(
            &ipv4([192, 168, 96, 2], [192, 168, 99, 1], b"moved"),
            &mut buffer,
        ) else {
            panic!("the victim has a session");
        };
        assert_eq!(endpoint.handle_datagram(roamed, data).packets.len(), 1);
        assert_eq!(endpoint.peer_stats()["victim"].endpoint, Some(roamed));
    }

    /// Indices are random (an index on the wire says nothing of the peers before or after
    /// it), unique, and each names its worker.
    #[test]
    fn peer_indices_are_random_unique_and_name_their_worker() {
        let shard = Shard::new(1, 3).expect("a shard");
        let mut endpoint = Endpoint::worker([1; 32], Endpoint::limiter([1; 32], 100), shard);
        let specs: Vec<PeerSpec> = (0..2_000u32)
            .map(|n| {
                let mut key = [0u8; 32];
                key[..4].copy_from_slice(&(n * 3 + 1).to_le_bytes());
                PeerSpec {
                    client: format!("c{n}"),
                    public_key: key,
                    preshared_key: PSK,
                    ranges: Vec::new(),
                }
            })
            .filter(|spec| shard.owns_key(&spec.public_key))
            .collect();
        let keys: Vec<Key> = specs.iter().map(|spec| spec.public_key).collect();
        endpoint.apply(Plan {
            add: specs,
            ..Plan::default()
        });
        let indices: Vec<u32> = keys.iter().map(|key| endpoint.by_key[key]).collect();
        assert_eq!(endpoint.peers.len(), keys.len());
        assert!(indices.iter().all(|index| worker_of_index(*index, 3) == 1));
        // Handed out in order, each index would follow the one before closely (by 3, this
        // worker's step); of random ones, about one pair in 16,000 does.
        let sequential = indices
            .windows(2)
            .filter(|pair| pair[1].wrapping_sub(pair[0]) % (1 << 24) <= 1_024)
            .count();
        assert!(
            sequential < 10,
            "{sequential} of {} in sequence",
            indices.len()
        );
    }

    #[test]
    fn garbage_is_dropped_without_a_panic() {
        let mut endpoint = endpoint_with(vec![spec("a", [2; 32], &["192.168.96.2/32"])]);
        let from: SocketAddr = FROM.parse().unwrap();
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..10_000 {
            let length = (next() % 300) as usize;
            let mut datagram: Vec<u8> = (0..length).map(|_| next() as u8).collect();
            // Every message type, so each parser sees garbage.
            if length >= 4 {
                datagram[..4].copy_from_slice(&((i % 5) as u32).to_le_bytes());
            }
            // A peer index from the header only if such a peer exists.
            assert!(
                endpoint
                    .data_peer(&datagram)
                    .is_none_or(|index| endpoint.peers.contains_key(&index))
            );
            let handled = endpoint.handle_datagram(from, &datagram);
            assert!(handled.packets.is_empty());
        }
    }

    #[test]
    fn data_datagrams_name_their_peer_before_decryption() {
        let private = [2; 32];
        let mut endpoint = endpoint_with(vec![spec("a", private, &["192.168.96.2/32"])]);
        let mut client = client_tunnel(private, endpoint.public_key());
        let handled = send_from(&mut endpoint, &mut client, [192, 168, 96, 2]);
        assert_eq!(handled.packets.len(), 1);
        let mut buffer = vec![0u8; BUFFER];
        let packet = ipv4([192, 168, 96, 2], [192, 168, 99, 1], b"again");
        let TunnResult::WriteToNetwork(data) = client.encapsulate(&packet, &mut buffer) else {
            panic!("a data datagram once the session is up");
        };
        let data = data.to_vec();
        let index = endpoint.data_peer(&data).expect("a known peer's data");
        assert!(endpoint.peers.contains_key(&index));
        // Another receiver index, or a handshake message: no peer.
        let mut stranger = data.clone();
        stranger[4..8].copy_from_slice(&0xffff_ff00u32.to_le_bytes());
        assert_eq!(endpoint.data_peer(&stranger), None);
        assert_eq!(endpoint.data_peer(&data[..31]), None);
    }
}
