//! Any datagram on UDP 31820: the endpoint (with one configured peer) must drop or answer
//! it without panicking — alone, and as each of two workers (whose shard names the other's
//! datagrams) — and any bytes a peer could send through the tunnel must be told apart
//! without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stowaway::endpoint::Endpoint;
use stowaway::packet;
use stowaway::peers::{PeerSpec, plan};
use stowaway::shard::{self, Shard};

fuzz_target!(|data: &[u8]| {
    let mut endpoint = Endpoint::new([1; 32]);
    let peer = PeerSpec {
        client: "fuzz".into(),
        public_key: [2; 32],
        preshared_key: [3; 32],
        ranges: vec!["192.168.96.2/32".parse().unwrap()],
    };
    endpoint.apply(plan(&Default::default(), &[([2; 32], peer.clone())].into()));
    let from = "198.51.100.7:51820".parse().unwrap();
    let _ = endpoint.data_peer(data);
    let _ = endpoint.handle_datagram(from, data);
    let limiter = Endpoint::limiter([1; 32], 100);
    for id in 0..2 {
        let shard = Shard::new(id, 2).expect("two workers");
        let mut worker = Endpoint::worker([1; 32], limiter.clone(), shard);
        worker.apply(plan(&Default::default(), &[([2; 32], peer.clone())].into()));
        let handled = worker.handle_datagram(from, data);
        assert!(handled.elsewhere.is_none_or(|other| other != id && other < 2));
        let _ = shard::worker_of_datagram(data, 2);
    }
    let _ = packet::classify(data);
    let _ = packet::prohibited(data);
    let _ = packet::destination(data);
});
