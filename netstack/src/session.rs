//! One WireGuard session with a peer (boringtun's `Tunn`), used the same way at both
//! ends: a datagram in gives the datagrams to send back and at most one IP packet for the
//! stack; a packet from the stack gives one datagram; timers give keep-alives, rekeys and
//! handshake retries.

use std::net::IpAddr;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};

/// Room boringtun needs beyond a packet to write its datagram (it panics on less).
pub const OVERHEAD: usize = 148;

/// What one received datagram gave, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Decapsulated<'a> {
    /// A datagram to send back: the answer to this datagram itself (`first`: a handshake
    /// response, the first data after a response) or a packet that waited for the
    /// handshake.
    Reply { datagram: &'a [u8], first: bool },
    /// A decrypted IP packet from the peer (its source address as written in it).
    Packet { source: IpAddr, packet: &'a [u8] },
    /// A decrypted keep-alive.
    KeepAlive,
    /// The datagram did not authenticate or is out of place.
    Rejected,
}

/// Hands a datagram from `from` to the session; `each` sees what it gave, in order.
/// `buffer` must hold the largest datagram (64 KiB).
pub fn decapsulate(
    tunnel: &mut Tunn,
    from: Option<IpAddr>,
    datagram: &[u8],
    buffer: &mut [u8],
    mut each: impl FnMut(Decapsulated<'_>),
) {
    let is_data = datagram.first() == Some(&4);
    let mut input = datagram;
    loop {
        let first = !input.is_empty();
        match tunnel.decapsulate(from, input, buffer) {
            TunnResult::Done => {
                if first && is_data {
                    each(Decapsulated::KeepAlive);
                }
                break;
            }
            TunnResult::Err(_) => {
                each(Decapsulated::Rejected);
                break;
            }
            TunnResult::WriteToNetwork(reply) => {
                each(Decapsulated::Reply {
                    datagram: reply,
                    first,
                });
                // Queued packets follow a handshake: drain them.
                input = &[];
            }
            TunnResult::WriteToTunnelV4(packet, source) => {
                each(Decapsulated::Packet {
                    source: IpAddr::V4(source),
                    packet,
                });
                break;
            }
            TunnResult::WriteToTunnelV6(packet, source) => {
                each(Decapsulated::Packet {
                    source: IpAddr::V6(source),
                    packet,
                });
                break;
            }
        }
    }
}

/// Encrypts an IP packet for the peer: the datagram to send (a handshake initiation if
/// the session has none yet; the packet then waits in the session's queue). The buffer
/// grows to fit; the datagram borrows it.
pub fn encapsulate<'b>(
    tunnel: &mut Tunn,
    packet: &[u8],
    buffer: &'b mut Vec<u8>,
) -> Option<&'b [u8]> {
    let needed = packet.len().saturating_add(OVERHEAD);
    if buffer.len() < needed {
        buffer.resize(needed, 0);
    }
    match tunnel.encapsulate(packet, buffer) {
        TunnResult::WriteToNetwork(datagram) => Some(datagram),
        _ => None,
    }
}

/// What the session's timers asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Timers<'a> {
    /// Nothing to send.
    Idle,
    /// A datagram to send (a keep-alive, a rekey, a handshake retry).
    Send(&'a [u8]),
    /// No handshake completed for too long: the session gave up (a new initiation starts
    /// it again).
    Expired,
}

/// Runs the session's timers; call about every second (WireGuard's timers tick in
/// quarter seconds).
pub fn timers<'b>(tunnel: &mut Tunn, buffer: &'b mut [u8]) -> Timers<'b> {
    match tunnel.update_timers(buffer) {
        TunnResult::WriteToNetwork(datagram) => Timers::Send(datagram),
        TunnResult::Err(WireGuardError::ConnectionExpired) => Timers::Expired,
        _ => Timers::Idle,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boringtun::x25519::{PublicKey, StaticSecret};

    fn pair() -> (Tunn, Tunn) {
        let a = StaticSecret::from([1u8; 32]);
        let b = StaticSecret::from([2u8; 32]);
        let psk = Some([7u8; 32]);
        (
            Tunn::new(a.clone(), PublicKey::from(&b), psk, None, 1, None),
            Tunn::new(b, PublicKey::from(&a), psk, None, 2, None),
        )
    }

    #[test]
    fn a_packet_goes_through_a_handshake_and_comes_out_the_other_end() {
        let (mut client, mut server) = pair();
        let mut buffer = vec![0u8; 65_536];
        let mut out = Vec::new();
        // An IPv4 header (20 bytes, version 4, total length 20): the smallest packet.
        let mut packet = vec![0u8; 20];
        packet[0] = 0x45;
        packet[3] = 20;
        packet[12..16].copy_from_slice(&[192, 168, 99, 2]);
        packet[16..20].copy_from_slice(&[192, 168, 99, 1]);
        let init = encapsulate(&mut client, &packet, &mut out)
            .unwrap()
            .to_vec();
        let mut replies = Vec::new();
        decapsulate(&mut server, None, &init, &mut buffer, |step| match step {
            Decapsulated::Reply { datagram, first } => replies.push((datagram.to_vec(), first)),
            other => panic!("unexpected {other:?}"),
        });
        assert_eq!(replies.len(), 1);
        assert!(replies[0].1, "the response answers the initiation");
        // The response gives the client its session; its queued packet follows.
        let mut queued = Vec::new();
        decapsulate(&mut client, None, &replies[0].0, &mut buffer, |step| {
            if let Decapsulated::Reply { datagram, .. } = step {
                queued.push(datagram.to_vec());
            }
        });
        assert!(!queued.is_empty());
        let mut packets = Vec::new();
        for datagram in &queued {
            decapsulate(&mut server, None, datagram, &mut buffer, |step| {
                if let Decapsulated::Packet { source, packet } = step {
                    packets.push((source, packet.to_vec()));
                }
            });
        }
        assert!(
            packets
                .iter()
                .any(|(source, p)| *p == packet && *source == IpAddr::from([192, 168, 99, 2]))
        );
    }

    #[test]
    fn garbage_is_rejected_without_a_panic() {
        let (_, mut server) = pair();
        let mut buffer = vec![0u8; 65_536];
        for datagram in [&[][..], &[4, 0, 0, 0][..], &[1; 148][..], &[4; 200][..]] {
            let mut steps = Vec::new();
            decapsulate(&mut server, None, datagram, &mut buffer, |step| {
                steps.push(format!("{step:?}"));
            });
            assert!(steps.iter().all(|s| !s.starts_with("Packet")), "{steps:?}");
        }
    }
}
