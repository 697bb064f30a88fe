//! A hostile client: a userspace WireGuard peer (boringtun) with a client's own keys, which
//! writes whatever IP packets it likes into its tunnel — any destination, any number of
//! flows, SYNs it never completes — as a real attacker holding one client file can.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4Packet, Icmpv4Repr, IpAddress, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, TcpControl,
    TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

use crate::lab::PeerConfig;

/// What came back through the tunnel, as far as the attacker cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Tcp {
        from: SocketAddrV4,
        to_port: u16,
        syn: bool,
        ack: bool,
        rst: bool,
        seq: u32,
        ack_number: u32,
        payload: Vec<u8>,
    },
    Udp {
        from: SocketAddrV4,
        to_port: u16,
        payload: Vec<u8>,
    },
    /// ICMP destination unreachable, with its code.
    Unreachable {
        code: u8,
    },
    Other,
}

/// What a TCP segment of the attacker's carries.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub control: TcpControl,
    pub seq: u32,
    pub ack: Option<u32>,
    /// Offered in a SYN: the other side then acknowledges out-of-order data selectively.
    pub sack_permitted: bool,
    pub payload: &'a [u8],
}

pub struct Attacker {
    tunnel: Tunn,
    socket: UdpSocket,
    stowaway: SocketAddr,
    pub address: Ipv4Addr,
    buffer: Vec<u8>,
}

impl Attacker {
    /// Handshakes with Stowaway at `stowaway` as the client whose `config` this is.
    pub fn connect(config: &PeerConfig, stowaway: SocketAddr) -> Result<Self> {
        let std::net::IpAddr::V4(address) = config.address else {
            bail!("an IPv4 tunnel address");
        };
        let tunnel = Tunn::new(
            StaticSecret::from(*config.private_key.bytes()),
            PublicKey::from(*config.server_public_key.bytes()),
            Some(*config.preshared_key.bytes()),
            None,
            rand::random::<u32>() >> 8,
            None,
        );
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut attacker = Self {
            tunnel,
            socket,
            stowaway,
            address,
            buffer: vec![0; 65_536],
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let TunnResult::WriteToNetwork(initiation) = attacker
                .tunnel
                .format_handshake_initiation(&mut attacker.buffer, true)
            {
                let initiation = initiation.to_vec();
                attacker.socket.send_to(&initiation, stowaway)?;
            }
            let until = Instant::now() + Duration::from_secs(1);
            while Instant::now() < until {
                attacker.receive_once()?;
                if attacker.tunnel.time_since_last_handshake().is_some() {
                    return Ok(attacker);
                }
            }
        }
        bail!("no WireGuard handshake with Stowaway at {stowaway} within 20 s")
    }

    /// Sends one IP packet through the tunnel.
    pub fn send(&mut self, packet: &[u8]) -> Result<()> {
        match self.tunnel.encapsulate(packet, &mut self.buffer) {
            TunnResult::WriteToNetwork(datagram) => {
                let datagram = datagram.to_vec();
                self.socket.send_to(&datagram, self.stowaway)?;
                Ok(())
            }
            TunnResult::Err(error) => bail!("encapsulating: {error:?}"),
            _ => Ok(()),
        }
    }

    /// Packets that come back within `wait` (until it passes with nothing more).
    pub fn receive(&mut self, wait: Duration) -> Result<Vec<Reply>> {
        let deadline = Instant::now() + wait;
        let mut replies = Vec::new();
        while Instant::now() < deadline {
            for packet in self.receive_once()? {
                replies.push(parse(&packet));
            }
        }
        Ok(replies)
    }

    /// One read of the socket (or its timeout): decrypted packets, and whatever the tunnel
    /// has to answer sent back.
    fn receive_once(&mut self) -> Result<Vec<Vec<u8>>> {
        let mut datagram = vec![0u8; 65_536];
        let length = match self.socket.recv_from(&mut datagram) {
            Ok((length, _)) => length,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Vec::new());
            }
            Err(error) => return Err(error.into()),
        };
        let mut packets = Vec::new();
        let mut input = datagram[..length].to_vec();
        loop {
            match self.tunnel.decapsulate(None, &input, &mut self.buffer) {
                TunnResult::WriteToNetwork(out) => {
                    let out = out.to_vec();
                    self.socket.send_to(&out, self.stowaway)?;
                    // Flush what the tunnel queued.
                    input.clear();
                }
                TunnResult::WriteToTunnelV4(packet, _) | TunnResult::WriteToTunnelV6(packet, _) => {
                    packets.push(packet.to_vec());
                    break;
                }
                _ => break,
            }
        }
        Ok(packets)
    }

    /// A TCP segment from the attacker's `port` to `to`, without data or options.
    pub fn tcp(
        &self,
        port: u16,
        to: SocketAddrV4,
        control: TcpControl,
        seq: u32,
        ack: Option<u32>,
    ) -> Vec<u8> {
        self.tcp_segment(
            port,
            to,
            &Segment {
                control,
                seq,
                ack,
                sack_permitted: false,
                payload: &[],
            },
        )
    }

    /// A TCP segment from the attacker's `port` to `to`.
    pub fn tcp_segment(&self, port: u16, to: SocketAddrV4, segment: &Segment) -> Vec<u8> {
        let Segment {
            control,
            seq,
            ack,
            sack_permitted,
            payload,
        } = *segment;
        let tcp = TcpRepr {
            src_port: port,
            dst_port: to.port(),
            control,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: ack.map(|ack| TcpSeqNumber(ack as i32)),
            window_len: 65_535,
            window_scale: None,
            max_seg_size: if control == TcpControl::Syn {
                Some(1360)
            } else {
                None
            },
            sack_permitted,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload,
        };
        let (from, destination): (Ipv4Address, Ipv4Address) = (self.address, *to.ip());
        let ip = Ipv4Repr {
            src_addr: from,
            dst_addr: destination,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let checksums = ChecksumCapabilities::default();
        let mut bytes = vec![0u8; ip.buffer_len() + tcp.buffer_len()];
        let mut packet = Ipv4Packet::new_unchecked(&mut bytes[..]);
        ip.emit(&mut packet, &checksums);
        tcp.emit(
            &mut TcpPacket::new_unchecked(packet.payload_mut()),
            &IpAddress::Ipv4(from),
            &IpAddress::Ipv4(destination),
            &checksums,
        );
        bytes
    }

    /// A UDP datagram from the attacker's `port` to `to`.
    pub fn udp(&self, port: u16, to: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
        let udp = UdpRepr {
            src_port: port,
            dst_port: to.port(),
        };
        let (from, destination): (Ipv4Address, Ipv4Address) = (self.address, *to.ip());
        let ip = Ipv4Repr {
            src_addr: from,
            dst_addr: destination,
            next_header: IpProtocol::Udp,
            payload_len: udp.header_len() + payload.len(),
            hop_limit: 64,
        };
        let checksums = ChecksumCapabilities::default();
        let mut bytes = vec![0u8; ip.buffer_len() + udp.header_len() + payload.len()];
        let mut packet = Ipv4Packet::new_unchecked(&mut bytes[..]);
        ip.emit(&mut packet, &checksums);
        udp.emit(
            &mut UdpPacket::new_unchecked(packet.payload_mut()),
            &IpAddress::Ipv4(from),
            &IpAddress::Ipv4(destination),
            payload.len(),
            |room| room.copy_from_slice(payload),
            &checksums,
        );
        bytes
    }
}

/// Tells a packet that came back apart.
pub fn parse(packet: &[u8]) -> Reply {
    let Ok(ip) = Ipv4Packet::new_checked(packet) else {
        return Reply::Other;
    };
    let from = ip.src_addr();
    match ip.next_header() {
        IpProtocol::Tcp => match TcpPacket::new_checked(ip.payload()) {
            Ok(tcp) => Reply::Tcp {
                from: SocketAddrV4::new(from, tcp.src_port()),
                to_port: tcp.dst_port(),
                syn: tcp.syn(),
                ack: tcp.ack(),
                rst: tcp.rst(),
                seq: tcp.seq_number().0 as u32,
                ack_number: tcp.ack_number().0 as u32,
                payload: tcp.payload().to_vec(),
            },
            Err(_) => Reply::Other,
        },
        IpProtocol::Udp => match UdpPacket::new_checked(ip.payload()) {
            Ok(udp) => Reply::Udp {
                from: SocketAddrV4::new(from, udp.src_port()),
                to_port: udp.dst_port(),
                payload: udp.payload().to_vec(),
            },
            Err(_) => Reply::Other,
        },
        IpProtocol::Icmp => match Icmpv4Packet::new_checked(ip.payload())
            .ok()
            .and_then(|icmp| Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::ignored()).ok())
        {
            Some(Icmpv4Repr::DstUnreachable { reason, .. }) => Reply::Unreachable {
                code: u8::from(reason),
            },
            _ => Reply::Other,
        },
        _ => Reply::Other,
    }
}

/// The attacker's TCP connection attempt to `to` from `port`: whether a SYN-ACK (`Ok(true)`)
/// or a reset (`Ok(false)`) came back.
pub fn syn_answered(attacker: &mut Attacker, port: u16, to: SocketAddrV4) -> Result<bool> {
    let syn = attacker.tcp(port, to, TcpControl::Syn, 1_000, None);
    attacker.send(&syn)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        for reply in attacker.receive(Duration::from_millis(200))? {
            if let Reply::Tcp {
                to_port, syn, rst, ..
            } = reply
                && to_port == port
            {
                if rst {
                    return Ok(false);
                }
                if syn {
                    return Ok(true);
                }
            }
        }
    }
    bail!("neither a SYN-ACK nor a reset for {to} from port {port} within 15 s")
}

/// The source port of the attacker's `index`th flow (well away from anything else).
pub fn port(index: u16) -> u16 {
    20_000u16.saturating_add(index)
}
