//! IP packets from peers, told apart; the few packets Stowaway builds itself (UDP replies
//! and ICMP echo replies). Pure: bytes in, bytes out.

use std::net::{IpAddr, SocketAddr};

use gefyra_api::ipam::SERVER_ADDRESS;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, Icmpv6DstUnreachable, Icmpv6Packet, Icmpv6Repr,
    IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpPacket, UdpPacket,
    UdpRepr,
};

/// Hop limit of the packets Stowaway builds.
const HOP_LIMIT: u8 = 64;

/// What a decrypted packet from a peer is, as far as forwarding cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// TCP; `opens` for a SYN without ACK (a new connection).
    Tcp {
        source: SocketAddr,
        destination: SocketAddr,
        opens: bool,
    },
    Udp {
        source: SocketAddr,
        destination: SocketAddr,
        payload: &'a [u8],
    },
    /// An echo request to the server's tunnel address; the reply to send back.
    Echo { reply: Vec<u8> },
    /// Anything else (other protocols, fragments, echo to other addresses, bad packets).
    Unsupported,
}

/// Tells a packet from a peer apart.
pub fn classify(packet: &[u8]) -> Inbound<'_> {
    match packet.first().map(|byte| byte >> 4) {
        Some(4) => classify_v4(packet),
        Some(6) => classify_v6(packet),
        _ => Inbound::Unsupported,
    }
}

fn classify_v4(packet: &[u8]) -> Inbound<'_> {
    let Ok(ip) = Ipv4Packet::new_checked(packet) else {
        return Inbound::Unsupported;
    };
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Inbound::Unsupported;
    }
    let (source, destination) = (IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr()));
    let header = usize::from(ip.header_len());
    let end = usize::from(ip.total_len()).min(packet.len());
    let payload = &packet[header.min(end)..end];
    match ip.next_header() {
        IpProtocol::Icmp if destination == SERVER_ADDRESS => echo_reply(&ip, payload),
        protocol => transport(protocol, source, destination, payload),
    }
}

fn classify_v6(packet: &[u8]) -> Inbound<'_> {
    let Ok(ip) = Ipv6Packet::new_checked(packet) else {
        return Inbound::Unsupported;
    };
    let (source, destination) = (IpAddr::V6(ip.src_addr()), IpAddr::V6(ip.dst_addr()));
    let start = ip.header_len();
    let end = (start + usize::from(ip.payload_len())).min(packet.len());
    transport(ip.next_header(), source, destination, &packet[start..end])
}

fn transport<'a>(
    protocol: IpProtocol,
    source: IpAddr,
    destination: IpAddr,
    payload: &'a [u8],
) -> Inbound<'a> {
    match protocol {
        IpProtocol::Tcp => match TcpPacket::new_checked(payload) {
            Ok(tcp) => Inbound::Tcp {
                source: SocketAddr::new(source, tcp.src_port()),
                destination: SocketAddr::new(destination, tcp.dst_port()),
                opens: tcp.syn() && !tcp.ack(),
            },
            Err(_) => Inbound::Unsupported,
        },
        IpProtocol::Udp => match UdpPacket::new_checked(payload) {
            Ok(udp) => {
                let length = usize::from(udp.len()).clamp(8, payload.len());
                Inbound::Udp {
                    source: SocketAddr::new(source, udp.src_port()),
                    destination: SocketAddr::new(destination, udp.dst_port()),
                    payload: &payload[8..length],
                }
            }
            Err(_) => Inbound::Unsupported,
        },
        _ => Inbound::Unsupported,
    }
}

fn echo_reply<'a>(ip: &Ipv4Packet<&[u8]>, payload: &[u8]) -> Inbound<'a> {
    let checksums = ChecksumCapabilities::default();
    let Ok(icmp) = Icmpv4Packet::new_checked(payload) else {
        return Inbound::Unsupported;
    };
    let Ok(Icmpv4Repr::EchoRequest {
        ident,
        seq_no,
        data,
    }) = Icmpv4Repr::parse(&icmp, &checksums)
    else {
        return Inbound::Unsupported;
    };
    let reply = Icmpv4Repr::EchoReply {
        ident,
        seq_no,
        data,
    };
    let header = Ipv4Repr {
        src_addr: ip.dst_addr(),
        dst_addr: ip.src_addr(),
        next_header: IpProtocol::Icmp,
        payload_len: reply.buffer_len(),
        hop_limit: HOP_LIMIT,
    };
    let mut bytes = vec![0u8; header.buffer_len() + reply.buffer_len()];
    let mut packet = Ipv4Packet::new_unchecked(&mut bytes[..]);
    header.emit(&mut packet, &checksums);
    reply.emit(
        &mut Icmpv4Packet::new_unchecked(packet.payload_mut()),
        &checksums,
    );
    Inbound::Echo { reply: bytes }
}

/// Bytes of the refused packet's payload quoted in an ICMP error (its ports).
const QUOTED: usize = 8;

/// The ICMP error "communication administratively prohibited" for a packet a peer sent
/// (IPv4 type 3 code 13, IPv6 type 1 code 1), from the destination it tried, quoting the
/// packet's header and first bytes as ICMP requires. `None` for what does not parse.
pub fn prohibited(packet: &[u8]) -> Option<Vec<u8>> {
    let checksums = ChecksumCapabilities::default();
    match packet.first().map(|byte| byte >> 4) {
        Some(4) => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            let header = usize::from(ip.header_len());
            let end = usize::from(ip.total_len()).min(packet.len());
            let payload = packet.get(header..end)?;
            let data = &payload[..payload.len().min(QUOTED)];
            let quoted = Ipv4Repr {
                src_addr: ip.src_addr(),
                dst_addr: ip.dst_addr(),
                next_header: ip.next_header(),
                payload_len: data.len(),
                hop_limit: ip.hop_limit(),
            };
            let icmp = Icmpv4Repr::DstUnreachable {
                reason: Icmpv4DstUnreachable::CommProhibited,
                header: quoted,
                data,
            };
            let outer = Ipv4Repr {
                src_addr: ip.dst_addr(),
                dst_addr: ip.src_addr(),
                next_header: IpProtocol::Icmp,
                payload_len: icmp.buffer_len(),
                hop_limit: HOP_LIMIT,
            };
            let mut bytes = vec![0u8; outer.buffer_len() + icmp.buffer_len()];
            let mut reply = Ipv4Packet::new_unchecked(&mut bytes[..]);
            outer.emit(&mut reply, &checksums);
            icmp.emit(
                &mut Icmpv4Packet::new_unchecked(reply.payload_mut()),
                &checksums,
            );
            Some(bytes)
        }
        Some(6) => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            let start = ip.header_len();
            let end = (start + usize::from(ip.payload_len())).min(packet.len());
            let payload = packet.get(start..end)?;
            let data = &payload[..payload.len().min(QUOTED)];
            let quoted = Ipv6Repr {
                src_addr: ip.src_addr(),
                dst_addr: ip.dst_addr(),
                next_header: ip.next_header(),
                payload_len: data.len(),
                hop_limit: ip.hop_limit(),
            };
            let icmp = Icmpv6Repr::DstUnreachable {
                reason: Icmpv6DstUnreachable::AdminProhibit,
                header: quoted,
                data,
            };
            let outer = Ipv6Repr {
                src_addr: ip.dst_addr(),
                dst_addr: ip.src_addr(),
                next_header: IpProtocol::Icmpv6,
                payload_len: icmp.buffer_len(),
                hop_limit: HOP_LIMIT,
            };
            let mut bytes = vec![0u8; outer.buffer_len() + icmp.buffer_len()];
            let mut reply = Ipv6Packet::new_unchecked(&mut bytes[..]);
            outer.emit(&mut reply);
            icmp.emit(
                &outer.src_addr,
                &outer.dst_addr,
                &mut Icmpv6Packet::new_unchecked(reply.payload_mut()),
                &checksums,
            );
            Some(bytes)
        }
        _ => None,
    }
}

/// A UDP datagram from `source` to `destination` (both of one IP version), as an IP packet.
pub fn udp_packet(source: SocketAddr, destination: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    let checksums = ChecksumCapabilities::default();
    let udp = UdpRepr {
        src_port: source.port(),
        dst_port: destination.port(),
    };
    let udp_len = udp.header_len() + payload.len();
    let (from, to) = (
        IpAddress::from(source.ip()),
        IpAddress::from(destination.ip()),
    );
    let emit_udp = |bytes: &mut [u8]| {
        udp.emit(
            &mut UdpPacket::new_unchecked(bytes),
            &from,
            &to,
            payload.len(),
            |room| room.copy_from_slice(payload),
            &checksums,
        )
    };
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(src_addr), IpAddr::V4(dst_addr)) => {
            let header = Ipv4Repr {
                src_addr,
                dst_addr,
                next_header: IpProtocol::Udp,
                payload_len: udp_len,
                hop_limit: HOP_LIMIT,
            };
            let mut bytes = vec![0u8; header.buffer_len() + udp_len];
            let mut packet = Ipv4Packet::new_unchecked(&mut bytes[..]);
            header.emit(&mut packet, &checksums);
            emit_udp(packet.payload_mut());
            Some(bytes)
        }
        (IpAddr::V6(src_addr), IpAddr::V6(dst_addr)) => {
            let header = Ipv6Repr {
                src_addr,
                dst_addr,
                next_header: IpProtocol::Udp,
                payload_len: udp_len,
                hop_limit: HOP_LIMIT,
            };
            let mut bytes = vec![0u8; header.buffer_len() + udp_len];
            let mut packet = Ipv6Packet::new_unchecked(&mut bytes[..]);
            header.emit(&mut packet);
            emit_udp(packet.payload_mut());
            Some(bytes)
        }
        _ => None,
    }
}

/// The destination address of an IP packet.
pub fn destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first().map(|byte| byte >> 4) {
        Some(4) => Ipv4Packet::new_checked(packet)
            .ok()
            .map(|ip| IpAddr::V4(ip.dst_addr())),
        Some(6) => Ipv6Packet::new_checked(packet)
            .ok()
            .map(|ip| IpAddr::V6(ip.dst_addr())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_refused_datagram_gets_an_administratively_prohibited_error_quoting_it() {
        let checksums = ChecksumCapabilities::default();
        let sent = udp_packet(addr("192.168.99.5:40000"), addr("127.0.0.1:9090"), b"x").unwrap();
        let error = prohibited(&sent).unwrap();
        let ip = Ipv4Packet::new_checked(&error[..]).unwrap();
        assert_eq!(IpAddr::V4(ip.dst_addr()), addr("192.168.99.5:0").ip());
        assert_eq!(ip.next_header(), IpProtocol::Icmp);
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        match Icmpv4Repr::parse(&icmp, &checksums).unwrap() {
            Icmpv4Repr::DstUnreachable {
                reason,
                header,
                data,
            } => {
                assert_eq!(reason, Icmpv4DstUnreachable::CommProhibited);
                assert_eq!(IpAddr::V4(header.dst_addr), addr("127.0.0.1:0").ip());
                // The quoted UDP header names the ports the peer's socket used.
                assert_eq!(&data[..2], &40000u16.to_be_bytes());
                assert_eq!(&data[2..4], &9090u16.to_be_bytes());
            }
            other => panic!("{other:?}"),
        }
        let sent = udp_packet(addr("[fd00::5]:40000"), addr("[::1]:53"), b"x").unwrap();
        let error = prohibited(&sent).unwrap();
        let ip = Ipv6Packet::new_checked(&error[..]).unwrap();
        assert_eq!(ip.next_header(), IpProtocol::Icmpv6);
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        let parsed = Icmpv6Repr::parse(&ip.src_addr(), &ip.dst_addr(), &icmp, &checksums).unwrap();
        assert!(matches!(
            parsed,
            Icmpv6Repr::DstUnreachable {
                reason: Icmpv6DstUnreachable::AdminProhibit,
                ..
            }
        ));
        assert_eq!(prohibited(b"garbage"), None);
        assert_eq!(prohibited(&[]), None);
    }

    #[test]
    fn udp_packets_round_trip_in_both_versions() {
        for (from, to) in [
            ("10.0.0.2:5353", "192.168.99.9:40000"),
            ("[fd00::2]:53", "[fd00:99::7]:40000"),
        ] {
            let packet = udp_packet(addr(from), addr(to), b"hello").unwrap();
            assert_eq!(destination(&packet), Some(addr(to).ip()));
            assert_eq!(
                classify(&packet),
                Inbound::Udp {
                    source: addr(from),
                    destination: addr(to),
                    payload: b"hello"
                }
            );
        }
        assert_eq!(
            udp_packet(addr("10.0.0.2:1"), addr("[fd00::1]:2"), b""),
            None
        );
    }

    #[test]
    fn echo_requests_to_the_server_address_are_answered() {
        let checksums = ChecksumCapabilities::default();
        let request = |to: [u8; 4]| {
            let icmp = Icmpv4Repr::EchoRequest {
                ident: 7,
                seq_no: 3,
                data: b"ping",
            };
            let header = Ipv4Repr {
                src_addr: [192, 168, 99, 5].into(),
                dst_addr: to.into(),
                next_header: IpProtocol::Icmp,
                payload_len: icmp.buffer_len(),
                hop_limit: 64,
            };
            let mut bytes = vec![0u8; 20 + icmp.buffer_len()];
            let mut packet = Ipv4Packet::new_unchecked(&mut bytes[..]);
            header.emit(&mut packet, &checksums);
            icmp.emit(
                &mut Icmpv4Packet::new_unchecked(packet.payload_mut()),
                &checksums,
            );
            bytes
        };
        let Inbound::Echo { reply } = classify(&request([192, 168, 99, 1])) else {
            panic!("an echo request to 192.168.99.1 is answered");
        };
        let ip = Ipv4Packet::new_checked(&reply[..]).unwrap();
        assert_eq!(ip.src_addr(), std::net::Ipv4Addr::new(192, 168, 99, 1));
        assert_eq!(ip.dst_addr(), std::net::Ipv4Addr::new(192, 168, 99, 5));
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(
            Icmpv4Repr::parse(&icmp, &checksums).unwrap(),
            Icmpv4Repr::EchoReply {
                ident: 7,
                seq_no: 3,
                data: b"ping"
            }
        );
        assert_eq!(classify(&request([10, 0, 0, 1])), Inbound::Unsupported);
    }

    #[test]
    fn garbage_is_unsupported() {
        for bytes in [&b""[..], &[0x45; 19], &[0x60; 39], &[0x45, 0, 0, 20]] {
            assert_eq!(classify(bytes), Inbound::Unsupported);
        }
    }
}
