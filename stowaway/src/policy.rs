//! Where a peer's traffic may go (the egress policy) and how much of what all peers share
//! one peer may hold (the limits). Pure: decisions from addresses and counts, no I/O.
//!
//! A userspace WireGuard client can write any destination into its packets, so the policy
//! is decided here, on the cluster side, never by the laptop's routing table.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

/// Destinations no flag can open: Stowaway's own loopback and unspecified addresses,
/// link-local (cloud metadata services live there), multicast and broadcast.
const NEVER: &[&str] = &[
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "255.255.255.255/32",
    "::/128",
    "::1/128",
    "fe80::/10",
    "ff00::/8",
];

/// Cloud metadata and platform services outside link-local (which is never reachable):
/// Alibaba's, AWS's over IPv6, Azure's wireserver. Denied unless `--deny-metadata-services
/// false` says otherwise; `--deny` adds to them, never replaces them.
pub const METADATA_SERVICES: &[&str] = &[
    "100.100.100.200/32",
    "fd00:ec2::254/128",
    "168.63.129.16/32",
];

/// Why a destination is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Loopback, unspecified, link-local, multicast or broadcast.
    Reserved(IpNet),
    /// One of Stowaway's own addresses (its pod: its metrics, any sidecar).
    OwnAddress,
    /// An address of one of Stowaway's own Services (they lead back to its pod).
    OwnService,
    /// Inside a `--deny` range.
    Denied(IpNet),
    /// Outside every `--allow` range (only when some are given).
    NotAllowed,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reserved(range) => write!(f, "{range} is never reachable through Stowaway"),
            Self::OwnAddress => write!(f, "Stowaway's own address"),
            Self::OwnService => write!(f, "an address of Stowaway's own Services"),
            Self::Denied(range) => write!(f, "denied by --deny {range}"),
            Self::NotAllowed => write!(f, "outside every --allow range"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EgressPolicy {
    never: Vec<IpNet>,
    deny: Vec<IpNet>,
    allow: Vec<IpNet>,
    own: Vec<IpAddr>,
    /// Addresses of Stowaway's own Services (learnt from the API, so they change).
    own_services: Vec<IpAddr>,
}

impl EgressPolicy {
    /// `allow` empty: every destination not refused otherwise.
    pub fn new(deny: Vec<IpNet>, allow: Vec<IpNet>, own: Vec<IpAddr>) -> Self {
        let never = NEVER
            .iter()
            .map(|range| range.parse().expect("a valid built-in range"))
            .collect();
        let own = own
            .into_iter()
            .map(|address| address.to_canonical())
            .collect();
        Self {
            never,
            deny,
            allow,
            own,
            own_services: Vec::new(),
        }
    }

    /// What `--deny` and `--deny-metadata-services` deny together.
    pub fn deny_list(extra: &[IpNet], metadata_services: bool) -> Vec<IpNet> {
        let metadata = METADATA_SERVICES
            .iter()
            .filter(|_| metadata_services)
            .map(|range| range.parse().expect("a valid built-in range"));
        metadata.chain(extra.iter().copied()).collect()
    }

    /// Stowaway's own addresses, as the policy refuses them.
    pub fn own(&self) -> &[IpAddr] {
        &self.own
    }

    /// The addresses of Stowaway's own Services, refused from now on (they replace the
    /// ones known before).
    pub fn set_own_services(&mut self, addresses: Vec<IpAddr>) {
        self.own_services = addresses
            .into_iter()
            .map(|address| address.to_canonical())
            .collect();
    }

    /// Whether a peer may reach `destination` (IPv4-mapped IPv6 counts as IPv4).
    pub fn check(&self, destination: IpAddr) -> Result<(), Refusal> {
        let destination = destination.to_canonical();
        if let Some(range) = self.never.iter().find(|range| range.contains(&destination)) {
            return Err(Refusal::Reserved(*range));
        }
        if self.own.contains(&destination) {
            return Err(Refusal::OwnAddress);
        }
        if self.own_services.contains(&destination) {
            return Err(Refusal::OwnService);
        }
        if let Some(range) = self.deny.iter().find(|range| range.contains(&destination)) {
            return Err(Refusal::Denied(*range));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|range| range.contains(&destination)) {
            return Err(Refusal::NotAllowed);
        }
        Ok(())
    }
}

/// What one peer may hold at once; each a count or bytes, checked before a flow opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerLimits {
    pub tcp_flows: usize,
    /// TCP connections whose cluster-side dial is under way.
    pub dials: usize,
    pub udp_flows: usize,
    /// Buffer space of the userspace stack reserved by the peer's TCP flows.
    pub buffer_bytes: usize,
}

/// Bounds shared by all peers: they protect the process (descriptors, memory), and each
/// peer may hold only its share of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalLimits {
    /// TCP and UDP flows together (each holds a descriptor and, for UDP, a port).
    pub flows: usize,
    pub buffer_bytes: usize,
    /// The least share of these a peer gets, however many peers there are.
    pub share_floor: Share,
}

/// What one peer may hold of the global bounds: they divided by the live peers (so the
/// share shrinks as peers arrive), never below the floor. A few peers cannot take
/// every flow from the others; once the floors add up to more than the bounds, the bounds
/// still hold, first come first served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Share {
    /// TCP and UDP flows together.
    pub flows: usize,
    pub buffer_bytes: usize,
}

/// What a flow holds while it is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// A TCP flow; `dialing` while its cluster-side connect is under way.
    Tcp {
        dialing: bool,
        buffer_bytes: usize,
    },
    Udp,
}

/// Which bound refused a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    PeerTcpFlows,
    PeerDials,
    PeerUdpFlows,
    PeerBuffer,
    /// The peer's share of the global bounds.
    PeerShare,
    GlobalFlows,
    GlobalBuffer,
}

impl LimitHit {
    /// The `gefyra_stowaway_dropped_packets_total` reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::PeerTcpFlows | Self::PeerDials | Self::PeerUdpFlows | Self::PeerBuffer => {
                "peer_limit"
            }
            Self::PeerShare => "peer_share",
            Self::GlobalFlows | Self::GlobalBuffer => "global_limit",
        }
    }
}

impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::PeerTcpFlows => "the peer's TCP flows (--peer-max-tcp-flows)",
            Self::PeerDials => "the peer's pending dials (--peer-max-dials)",
            Self::PeerUdpFlows => "the peer's UDP flows (--peer-max-udp-flows)",
            Self::PeerBuffer => "the peer's buffer space (--peer-max-buffer-bytes)",
            Self::PeerShare => {
                "the peer's share of all flows and buffer space (--max-flows and --max-buffer-bytes divided among the peers, at least --peer-min-share-flows)"
            }
            Self::GlobalFlows => "all flows (--max-flows)",
            Self::GlobalBuffer => "all buffer space (--max-buffer-bytes)",
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub tcp_flows: usize,
    pub dials: usize,
    pub udp_flows: usize,
    pub buffer_bytes: usize,
}

impl Usage {
    fn add(&mut self, holding: Holding) {
        match holding {
            Holding::Tcp {
                dialing,
                buffer_bytes,
            } => {
                self.tcp_flows = self.tcp_flows.saturating_add(1);
                self.dials = self.dials.saturating_add(usize::from(dialing));
                self.buffer_bytes = self.buffer_bytes.saturating_add(buffer_bytes);
            }
            Holding::Udp => self.udp_flows = self.udp_flows.saturating_add(1),
        }
    }

    fn remove(&mut self, holding: Holding) {
        match holding {
            Holding::Tcp {
                dialing,
                buffer_bytes,
            } => {
                self.tcp_flows = self.tcp_flows.saturating_sub(1);
                self.dials = self.dials.saturating_sub(usize::from(dialing));
                self.buffer_bytes = self.buffer_bytes.saturating_sub(buffer_bytes);
            }
            Holding::Udp => self.udp_flows = self.udp_flows.saturating_sub(1),
        }
    }

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Who holds what: admits a flow only within its peer's and the global bounds, so a peer
/// over its limit is refused new flows and the others are not.
#[derive(Debug)]
pub struct Ledger<P> {
    peer: PeerLimits,
    global: GlobalLimits,
    /// Live peers, among whom the global bounds are shared.
    peers: usize,
    by_peer: HashMap<P, Usage>,
    total: Usage,
}

impl<P: std::hash::Hash + Eq + Clone> Ledger<P> {
    pub fn new(peer: PeerLimits, global: GlobalLimits) -> Self {
        Self {
            peer,
            global,
            peers: 1,
            by_peer: HashMap::new(),
            total: Usage::default(),
        }
    }

    /// The peers among whom the global bounds are shared (the live ones).
    pub fn set_peers(&mut self, peers: usize) {
        self.peers = peers.max(1);
    }

    /// What one peer may hold of the global bounds now.
    pub fn share(&self) -> Share {
        let floor = self.global.share_floor;
        Share {
            flows: (self.global.flows / self.peers).max(floor.flows),
            buffer_bytes: (self.global.buffer_bytes / self.peers).max(floor.buffer_bytes),
        }
    }

    /// How far `peer` holds more than its share (after the share shrank): flows and bytes
    /// to give back, zero when within it.
    pub fn excess(&self, peer: &P) -> Share {
        let usage = self.usage(peer);
        let share = self.share();
        Share {
            flows: (usage.tcp_flows + usage.udp_flows).saturating_sub(share.flows),
            buffer_bytes: usage.buffer_bytes.saturating_sub(share.buffer_bytes),
        }
    }

    /// Records `holding` for `peer` if every bound allows it.
    pub fn admit(&mut self, peer: &P, holding: Holding) -> Result<(), LimitHit> {
        let usage = self.by_peer.get(peer).copied().unwrap_or_default();
        let mut after = usage;
        after.add(holding);
        let mut total = self.total;
        total.add(holding);
        let limits = self.peer;
        if after.tcp_flows > limits.tcp_flows {
            return Err(LimitHit::PeerTcpFlows);
        }
        if after.dials > limits.dials {
            return Err(LimitHit::PeerDials);
        }
        if after.udp_flows > limits.udp_flows {
            return Err(LimitHit::PeerUdpFlows);
        }
        if after.buffer_bytes > limits.buffer_bytes {
            return Err(LimitHit::PeerBuffer);
        }
        let share = self.share();
        if after.tcp_flows.saturating_add(after.udp_flows) > share.flows
            || after.buffer_bytes > share.buffer_bytes
        {
            return Err(LimitHit::PeerShare);
        }
        if total.tcp_flows.saturating_add(total.udp_flows) > self.global.flows {
            return Err(LimitHit::GlobalFlows);
        }
        if total.buffer_bytes > self.global.buffer_bytes {
            return Err(LimitHit::GlobalBuffer);
        }
        self.by_peer.insert(peer.clone(), after);
        self.total = total;
        Ok(())
    }

    /// Gives back what `admit` recorded (a flow ended).
    pub fn release(&mut self, peer: &P, holding: Holding) {
        if let Some(usage) = self.by_peer.get_mut(peer) {
            usage.remove(holding);
            self.total.remove(holding);
            if usage.is_empty() {
                self.by_peer.remove(peer);
            }
        }
    }

    /// A dial finished: the flow stays, the pending dial is no more.
    pub fn dialed(&mut self, peer: &P) {
        if let Some(usage) = self.by_peer.get_mut(peer) {
            usage.dials = usage.dials.saturating_sub(1);
            self.total.dials = self.total.dials.saturating_sub(1);
        }
    }

    pub fn usage(&self, peer: &P) -> Usage {
        self.by_peer.get(peer).copied().unwrap_or_default()
    }

    pub fn total(&self) -> Usage {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(deny: &[&str], allow: &[&str], own: &[&str]) -> EgressPolicy {
        EgressPolicy::new(
            deny.iter().map(|range| range.parse().unwrap()).collect(),
            allow.iter().map(|range| range.parse().unwrap()).collect(),
            own.iter().map(|address| address.parse().unwrap()).collect(),
        )
    }

    fn check(policy: &EgressPolicy, destination: &str) -> Result<(), Refusal> {
        policy.check(destination.parse().unwrap())
    }

    #[test]
    fn loopback_link_local_multicast_and_own_addresses_are_never_reachable() {
        // Even with an allow list that names them.
        let policy = policy(&[], &["0.0.0.0/0", "::/0"], &["10.244.1.7"]);
        for destination in [
            "127.0.0.1",
            "127.8.9.10",
            "0.0.0.0",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "169.254.169.254",
            "fe80::1",
            "224.0.0.251",
            "ff02::1",
            "255.255.255.255",
        ] {
            assert!(
                matches!(check(&policy, destination), Err(Refusal::Reserved(_))),
                "{destination}"
            );
        }
        assert_eq!(check(&policy, "10.244.1.7"), Err(Refusal::OwnAddress));
        assert_eq!(
            check(&policy, "::ffff:10.244.1.7"),
            Err(Refusal::OwnAddress)
        );
        assert_eq!(check(&policy, "10.244.1.8"), Ok(()));
    }

    #[test]
    fn the_addresses_of_stowaways_own_services_are_never_reachable_and_may_change() {
        let mut policy = policy(&[], &["0.0.0.0/0"], &[]);
        assert_eq!(check(&policy, "10.96.0.20"), Ok(()));
        policy.set_own_services(vec!["10.96.0.20".parse().unwrap()]);
        assert_eq!(check(&policy, "10.96.0.20"), Err(Refusal::OwnService));
        assert_eq!(
            check(&policy, "::ffff:10.96.0.20"),
            Err(Refusal::OwnService)
        );
        // The Service was recreated with another address.
        policy.set_own_services(vec!["10.96.0.30".parse().unwrap()]);
        assert_eq!(check(&policy, "10.96.0.20"), Ok(()));
        assert_eq!(check(&policy, "10.96.0.30"), Err(Refusal::OwnService));
    }

    #[test]
    fn deny_wins_and_an_allow_list_admits_only_its_ranges() {
        let open = policy(&["10.96.0.0/12"], &[], &[]);
        assert_eq!(
            check(&open, "10.96.0.10"),
            Err(Refusal::Denied("10.96.0.0/12".parse().unwrap()))
        );
        assert_eq!(check(&open, "8.8.8.8"), Ok(()));
        let closed = policy(&["10.96.0.10/32"], &["10.96.0.0/12", "fd00::/8"], &[]);
        assert_eq!(check(&closed, "10.96.1.1"), Ok(()));
        assert_eq!(check(&closed, "fd00::5"), Ok(()));
        assert_eq!(check(&closed, "8.8.8.8"), Err(Refusal::NotAllowed));
        assert!(matches!(
            check(&closed, "10.96.0.10"),
            Err(Refusal::Denied(_))
        ));
        let defaults = EgressPolicy::new(EgressPolicy::deny_list(&[], true), vec![], vec![]);
        for metadata in [
            "100.100.100.200",
            "fd00:ec2::254",
            "168.63.129.16",
            "169.254.169.254",
        ] {
            assert!(check(&defaults, metadata).is_err(), "{metadata}");
        }
        // A --deny of one's own keeps the metadata services denied; only an explicit
        // --deny-metadata-services false opens them (link-local never).
        let extra: IpNet = "10.0.0.0/8".parse().unwrap();
        let more = EgressPolicy::new(EgressPolicy::deny_list(&[extra], true), vec![], vec![]);
        assert!(check(&more, "10.1.2.3").is_err());
        assert!(check(&more, "168.63.129.16").is_err());
        let opened = EgressPolicy::new(EgressPolicy::deny_list(&[extra], false), vec![], vec![]);
        assert_eq!(check(&opened, "168.63.129.16"), Ok(()));
        assert!(check(&opened, "169.254.169.254").is_err());
    }

    const PEER: PeerLimits = PeerLimits {
        tcp_flows: 3,
        dials: 2,
        udp_flows: 2,
        buffer_bytes: 250,
    };
    const TCP: Holding = Holding::Tcp {
        dialing: true,
        buffer_bytes: 100,
    };

    #[test]
    fn a_peer_over_its_limits_is_refused_and_the_others_are_not() {
        let mut ledger = Ledger::new(
            PEER,
            GlobalLimits {
                flows: 100,
                buffer_bytes: 10_000,
                share_floor: FLOOR,
            },
        );
        assert_eq!(ledger.admit(&"a", TCP), Ok(()));
        assert_eq!(ledger.admit(&"a", TCP), Ok(()));
        assert_eq!(ledger.admit(&"a", TCP), Err(LimitHit::PeerDials));
        ledger.dialed(&"a");
        assert_eq!(ledger.admit(&"a", TCP), Err(LimitHit::PeerBuffer));
        assert_eq!(ledger.admit(&"a", Holding::Udp), Ok(()));
        assert_eq!(ledger.admit(&"a", Holding::Udp), Ok(()));
        assert_eq!(
            ledger.admit(&"a", Holding::Udp),
            Err(LimitHit::PeerUdpFlows)
        );
        // Another peer is untouched by a's usage.
        assert_eq!(ledger.admit(&"b", TCP), Ok(()));
        assert_eq!(ledger.admit(&"b", Holding::Udp), Ok(()));
        // Released, a flow's room is a's again.
        ledger.release(&"a", TCP);
        assert_eq!(ledger.admit(&"a", TCP), Ok(()));
        assert_eq!(ledger.usage(&"a").tcp_flows, 2);
    }

    const FLOOR: Share = Share {
        flows: 2,
        buffer_bytes: 200,
    };

    /// Three greedy peers of four live ones hold at most a quarter each; the fourth still
    /// opens flows. With more peers the share shrinks, never below the floor.
    #[test]
    fn greedy_peers_hold_at_most_their_share_and_another_still_connects() {
        let roomy = PeerLimits {
            tcp_flows: 1_000,
            dials: 1_000,
            udp_flows: 1_000,
            buffer_bytes: 1 << 20,
        };
        let global = GlobalLimits {
            flows: 40,
            buffer_bytes: 2_000,
            share_floor: FLOOR,
        };
        let mut ledger = Ledger::new(roomy, global);
        ledger.set_peers(4);
        let established = Holding::Tcp {
            dialing: false,
            buffer_bytes: 50,
        };
        for greedy in ["a", "b", "c"] {
            let held = (0..100)
                .take_while(|_| ledger.admit(&greedy, established).is_ok())
                .count();
            assert_eq!(held, 10, "{greedy}: 2,000 bytes / 4 peers / 50 a flow");
            assert_eq!(
                ledger.admit(&greedy, Holding::Udp),
                Err(LimitHit::PeerShare)
            );
        }
        assert_eq!(ledger.admit(&"d", established), Ok(()));
        assert_eq!(ledger.admit(&"d", Holding::Udp), Ok(()));
        // Twenty peers: 2 flows or 100 bytes each, but the floor is 2 flows and 200 bytes;
        // the greedy ones now hold more than that and give back the excess.
        ledger.set_peers(20);
        assert_eq!(ledger.share(), FLOOR);
        assert_eq!(
            ledger.excess(&"a"),
            Share {
                flows: 8,
                buffer_bytes: 300
            }
        );
        assert_eq!(ledger.excess(&"d"), Share::default());
    }

    #[test]
    fn the_global_bounds_hold_across_peers() {
        let mut ledger = Ledger::new(
            PEER,
            GlobalLimits {
                flows: 3,
                buffer_bytes: 10_000,
                share_floor: FLOOR,
            },
        );
        for peer in ["a", "b", "c"] {
            assert_eq!(ledger.admit(&peer, Holding::Udp), Ok(()));
        }
        assert_eq!(ledger.admit(&"d", Holding::Udp), Err(LimitHit::GlobalFlows));
    }

    proptest! {
        /// Whatever order flows open and end in, usage never exceeds a bound and returns to
        /// zero when everything is released.
        #[test]
        fn usage_stays_within_bounds_and_returns_to_zero(
            steps in proptest::collection::vec((0u8..4, 0u8..3, any::<bool>()), 0..200),
            peers in 1usize..6,
        ) {
            let global = GlobalLimits { flows: 8, buffer_bytes: 600, share_floor: FLOOR };
            let mut ledger = Ledger::new(PEER, global);
            ledger.set_peers(peers);
            let mut held: Vec<(u8, Holding)> = Vec::new();
            for (peer, kind, open) in steps {
                let holding = match kind {
                    0 => TCP,
                    1 => Holding::Tcp { dialing: false, buffer_bytes: 100 },
                    _ => Holding::Udp,
                };
                if open {
                    if ledger.admit(&peer, holding).is_ok() {
                        held.push((peer, holding));
                    }
                } else if let Some(index) = held.iter().position(|(p, _)| *p == peer) {
                    let (peer, holding) = held.remove(index);
                    ledger.release(&peer, holding);
                }
                for peer in 0..4u8 {
                    let usage = ledger.usage(&peer);
                    prop_assert!(usage.tcp_flows <= PEER.tcp_flows);
                    prop_assert!(usage.dials <= PEER.dials);
                    prop_assert!(usage.udp_flows <= PEER.udp_flows);
                    prop_assert!(usage.buffer_bytes <= PEER.buffer_bytes);
                    let share = ledger.share();
                    prop_assert!(usage.tcp_flows + usage.udp_flows <= share.flows);
                    prop_assert!(usage.buffer_bytes <= share.buffer_bytes);
                }
                let total = ledger.total();
                prop_assert!(total.tcp_flows + total.udp_flows <= global.flows);
                prop_assert!(total.buffer_bytes <= global.buffer_bytes);
            }
            for (peer, holding) in held {
                ledger.release(&peer, holding);
            }
            prop_assert_eq!(ledger.total(), Usage::default());
        }
    }
}
