//! Which data-plane worker owns a peer, and how the kernel is told. Pure but for the
//! socket option in `steer`.
//!
//! Peers are sharded across workers: a peer's session, flows and forwards live on one
//! worker. Each worker reads its own WireGuard socket (`SO_REUSEPORT`, one port), and a
//! classic BPF program attached to the group steers every datagram that names its receiver
//! (handshake response, cookie reply, transport data) to the socket of the worker whose
//! index it names — so a peer that roams (a new source port) still lands on its worker, and
//! data never crosses threads. An initiation names its peer only inside its encryption: it
//! lands wherever the kernel hashes it, and the worker that reads it hands it over.
//!
//! A receiver index is `peer << 8 | session` (boringtun), little-endian on the wire; the
//! worker of a peer index is its low byte modulo the number of workers, so the program reads
//! one byte. Each worker hands out only indices whose low byte is its own.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};

use nix::libc::{
    BPF_A, BPF_ABS, BPF_ALU, BPF_B, BPF_JA, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_MOD, BPF_RET,
    sock_filter, sock_fprog,
};

use crate::peers::Key;

/// Workers a data plane may have (a peer index's low byte chooses one).
pub const MAX_WORKERS: usize = 64;
/// Workers `--workers 0` asks for at most (one per CPU up to this).
const DEFAULT_WORKERS_AT_MOST: usize = 8;

/// The workers of `--workers 0`: one per CPU this process may use (a container's CPU limit
/// counts), at most `DEFAULT_WORKERS_AT_MOST`.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .min(DEFAULT_WORKERS_AT_MOST)
}

/// One worker among `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    id: usize,
    count: usize,
}

impl Shard {
    /// The only worker.
    pub const ALONE: Self = Self { id: 0, count: 1 };

    /// Worker `id` of `count` (`count` within 1..=`MAX_WORKERS`, `id` below it).
    pub fn new(id: usize, count: usize) -> Option<Self> {
        ((1..=MAX_WORKERS).contains(&count) && id < count).then_some(Self { id, count })
    }

    pub fn id(self) -> usize {
        self.id
    }

    pub fn count(self) -> usize {
        self.count
    }

    /// Whether this worker owns the peer with this public key.
    pub fn owns_key(self, key: &Key) -> bool {
        worker_of_key(key, self.count) == self.id
    }

    /// The peer index of this worker that 32 random bits choose: the upper 16 bits of the
    /// index random, the low byte (the worker, as the steering program reads it) one of this
    /// worker's, never 0 (which boringtun never sees from us). Random, so that an index on
    /// the wire says nothing of how many peers came before it or which comes next.
    pub fn index_from(self, random: u32) -> u32 {
        let (id, count) = (self.id as u32, self.count as u32);
        // Low bytes id, id + count, ... below 256: at least 4 of them (`new` keeps count ≤ 64).
        let low_bytes = (256 - id).div_ceil(count);
        let low = id + (random & 0xff) % low_bytes * count;
        let index = ((random >> 8) & 0xffff) << 8 | low;
        if index == 0 { 1 << 8 } else { index }
    }
}

/// The worker that owns the peer with this public key.
pub fn worker_of_key(key: &Key, count: usize) -> usize {
    let word = u32::from_le_bytes([key[0], key[1], key[2], key[3]]);
    usize::try_from(word).unwrap_or(0) % count.max(1)
}

/// The worker that owns a peer index (the upper 24 bits of a receiver index).
pub fn worker_of_index(index: u32, count: usize) -> usize {
    usize::from(index.to_le_bytes()[0]) % count.max(1)
}

/// The worker a datagram names by its receiver index, as the steering program reads it:
/// handshake response (type 2, receiver at byte 8), cookie reply (3) and transport data (4,
/// receiver at byte 4). `None` for an initiation, anything else, or one too short.
pub fn worker_of_datagram(datagram: &[u8], count: usize) -> Option<usize> {
    let low_byte = match datagram.first()? {
        2 => datagram.get(9)?,
        3 | 4 => datagram.get(5)?,
        _ => return None,
    };
    Some(usize::from(*low_byte) % count.max(1))
}

fn statement(code: u32, k: u32) -> sock_filter {
    jump(code, k, 0, 0)
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: u16::try_from(code).unwrap_or(u16::MAX),
        jt,
        jf,
        k,
    }
}

/// The steering program for `count` workers (classic BPF on the UDP payload; the socket
/// index it returns is the worker's, as workers join the group in order). What it does not
/// steer it answers with an index past the group, and the kernel falls back to its hash.
pub fn steering_program(count: usize) -> Vec<sock_filter> {
    let count = u32::try_from(count.max(1)).unwrap_or(1);
    vec![
        /* 0 */ statement(BPF_LD | BPF_B | BPF_ABS, 0),
        /* 1 */ jump(BPF_JMP | BPF_JEQ | BPF_K, 2, 4, 0), // response → 6
        /* 2 */ jump(BPF_JMP | BPF_JEQ | BPF_K, 3, 1, 0), // cookie reply → 4
        /* 3 */ jump(BPF_JMP | BPF_JEQ | BPF_K, 4, 0, 5), // data → 4, else → 9
        /* 4 */ statement(BPF_LD | BPF_B | BPF_ABS, 5),
        /* 5 */ statement(BPF_JMP | BPF_JA, 1), // → 7
        /* 6 */ statement(BPF_LD | BPF_B | BPF_ABS, 9),
        /* 7 */ statement(BPF_ALU | BPF_MOD | BPF_K, count),
        /* 8 */ statement(BPF_RET | BPF_A, 0),
        /* 9 */ statement(BPF_RET | BPF_K, u32::MAX),
    ]
}

/// Attaches the steering program to a socket of the group (it applies to all of them).
pub fn steer(socket: &impl AsFd, count: usize) -> std::io::Result<()> {
    let mut program = steering_program(count);
    let fprog = sock_fprog {
        len: u16::try_from(program.len()).unwrap_or(u16::MAX),
        filter: program.as_mut_ptr(),
    };
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::AttachReusePortCbpf,
        &fprog,
    )
    .map_err(std::io::Error::from)
}

/// Binds the WireGuard sockets of `count` workers to `address`, in worker order: one
/// ordinary socket for one worker; else a `SO_REUSEPORT` group steered by
/// `steering_program` (if the kernel refuses the program, datagrams land by its hash and
/// workers hand over what is not theirs). A port another socket holds is refused here, as
/// for one socket; port 0 is one free port for the whole group.
pub fn bind_group(
    address: SocketAddr,
    count: usize,
) -> std::io::Result<(Vec<std::net::UdpSocket>, Option<std::io::Error>)> {
    let probe = std::net::UdpSocket::bind(address)?;
    if count <= 1 {
        size_buffers(&probe);
        return Ok((vec![probe], None));
    }
    // The probe holds the port exclusively: a reuse-port group of another process cannot
    // share a port that was free a moment ago (binding port 0 with SO_REUSEPORT could).
    let address = probe.local_addr()?;
    drop(probe);
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = bind_reusable(address)?;
        size_buffers(&socket);
        sockets.push(socket);
    }
    let steering = steer(&sockets[0], count).err();
    Ok((sockets, steering))
}

/// Socket buffers asked of the kernel for each WireGuard socket, both ways (as
/// wireguard-go asks 7 MiB): at the default of about 208 KiB a burst of 1.4 KB datagrams
/// overflows the receive buffer within 2 ms of a busy turn. The kernel gives at most
/// `net.core.rmem_max` / `wmem_max` to an unprivileged process.
const SOCKET_BUFFER: usize = 4 << 20;

/// Asks for `SOCKET_BUFFER` both ways; what the kernel grants is what there is.
fn size_buffers(socket: &std::net::UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(socket, sockopt::RcvBuf, &SOCKET_BUFFER);
    let _ = setsockopt(socket, sockopt::SndBuf, &SOCKET_BUFFER);
}

fn bind_reusable(address: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket, sockopt,
    };
    let family = if address.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let socket = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&socket, sockopt::ReusePort, &true)?;
    bind(socket.as_raw_fd(), &SockaddrStorage::from(address))?;
    Ok(std::net::UdpSocket::from(socket))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Peer indices are 24 bits (boringtun keeps the low 8 of the receiver index for itself).
    const INDICES: u32 = 1 << 24;

    #[test]
    fn counts_outside_one_to_sixty_four_and_ids_past_the_count_are_refused() {
        assert_eq!(Shard::new(0, 0), None);
        assert_eq!(Shard::new(2, 2), None);
        assert_eq!(Shard::new(0, MAX_WORKERS + 1), None);
        assert_eq!(Shard::new(63, 64), Some(Shard { id: 63, count: 64 }));
    }

    #[test]
    fn datagrams_name_their_worker_by_the_receiver_index_and_initiations_do_not() {
        let mut data = vec![4, 0, 0, 0, 0x17, 0x05, 0, 0];
        data.resize(32, 0);
        assert_eq!(worker_of_datagram(&data, 3), Some(5 % 3));
        let mut response = vec![2, 0, 0, 0, 9, 9, 9, 9, 0x00, 0x07, 0, 0];
        response.resize(92, 0);
        assert_eq!(worker_of_datagram(&response, 4), Some(3));
        let cookie = [3, 0, 0, 0, 1, 0x02, 0, 0];
        assert_eq!(worker_of_datagram(&cookie, 2), Some(0));
        assert_eq!(worker_of_datagram(&[1; 148], 2), None);
        assert_eq!(worker_of_datagram(&[4, 0, 0], 2), None);
        assert_eq!(worker_of_datagram(&[], 2), None);
    }

    /// Every index of a worker can be chosen: each of its low bytes, under any upper half.
    #[test]
    fn random_bits_reach_every_index_of_a_worker() {
        for (id, count) in [(0, 1), (0, 2), (1, 2), (5, 64), (63, 64)] {
            let shard = Shard::new(id, count).expect("a valid shard");
            for high in [0u32, 1, 0xbeef, 0xffff] {
                let chosen: std::collections::BTreeSet<u32> = (0..=255u32)
                    .map(|low| shard.index_from(high << 8 | low))
                    .collect();
                let expected: std::collections::BTreeSet<u32> = (0..=255u32)
                    .filter(|low| *low as usize % count == id)
                    .map(|low| high << 8 | low)
                    .map(|index| if index == 0 { 1 << 8 } else { index })
                    .collect();
                assert_eq!(
                    chosen, expected,
                    "worker {id} of {count}, upper half {high}"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn a_worker_hands_out_only_its_own_indices_and_never_zero(
            count in 1..=MAX_WORKERS, id_seed: usize, random: u32
        ) {
            let shard = Shard::new(id_seed % count, count).expect("a valid shard");
            let index = shard.index_from(random);
            prop_assert!(index != 0 && index < INDICES);
            prop_assert_eq!(worker_of_index(index, count), shard.id);
            // The receiver indices boringtun makes of it name the same worker on the wire.
            let receiver = (index << 8) | 0xab;
            let mut data = vec![4, 0, 0, 0];
            data.extend_from_slice(&receiver.to_le_bytes());
            data.resize(32, 0);
            prop_assert_eq!(worker_of_datagram(&data, count), Some(shard.id));
        }

        #[test]
        fn every_key_has_exactly_one_owner(key: [u8; 32], count in 1..=MAX_WORKERS) {
            let owners = (0..count)
                .filter(|&id| Shard::new(id, count).is_some_and(|shard| shard.owns_key(&key)))
                .count();
            prop_assert_eq!(owners, 1);
        }
    }

    /// Each socket gets the receive and send buffers asked for, as far as the kernel's
    /// limits for an unprivileged process go (Linux reports twice what it grants).
    #[test]
    fn every_socket_of_a_group_gets_large_buffers_within_the_kernels_limits() {
        use nix::sys::socket::{getsockopt, sockopt};
        let limit = |name: &str| -> usize {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .unwrap_or(0)
        };
        let (receive_max, send_max) = (limit("rmem_max"), limit("wmem_max"));
        for count in [1, 2] {
            let (sockets, _) =
                bind_group("127.0.0.1:0".parse().unwrap(), count).expect("a socket group");
            for socket in &sockets {
                let receive = getsockopt(socket, sockopt::RcvBuf).unwrap();
                let send = getsockopt(socket, sockopt::SndBuf).unwrap();
                assert!(receive >= 2 * SOCKET_BUFFER.min(receive_max), "{receive}");
                assert!(send >= 2 * SOCKET_BUFFER.min(send_max), "{send}");
            }
        }
    }

    /// The program in a real kernel: datagrams naming worker k reach socket k, whatever
    /// port they come from; the rest are spread by the kernel's hash.
    #[test]
    fn the_kernel_steers_each_datagram_to_the_socket_of_the_worker_it_names() {
        let count = 3;
        let (sockets, refused) =
            bind_group("127.0.0.1:0".parse().unwrap(), count).expect("a socket group");
        assert!(refused.is_none(), "steering refused: {refused:?}");
        let target = sockets[0].local_addr().unwrap();
        for socket in &sockets {
            assert_eq!(socket.local_addr().unwrap(), target);
            socket
                .set_read_timeout(Some(std::time::Duration::from_millis(200)))
                .unwrap();
        }
        // A port another socket holds is refused, as for one socket.
        assert!(bind_group(target, count).is_err());
        let mut expected = Vec::new();
        for sender in 0..6u8 {
            let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            for low_byte in 0..6u8 {
                let mut data = vec![4, 0, 0, 0, 0x33, low_byte, 0, 0, sender];
                data.resize(32, 0);
                client.send_to(&data, target).unwrap();
                expected.push((data, usize::from(low_byte) % count));
                let mut response = vec![2, 0, 0, 0, 1, 2, 3, 4, 0x44, low_byte, 0, 0, sender];
                response.resize(92, 0);
                client.send_to(&response, target).unwrap();
                expected.push((response, usize::from(low_byte) % count));
            }
        }
        let mut buffer = [0u8; 256];
        let mut received = 0;
        for (worker, socket) in sockets.iter().enumerate() {
            while let Ok((length, _)) = socket.recv_from(&mut buffer) {
                let datagram = &buffer[..length];
                let (_, owner) = expected
                    .iter()
                    .find(|(sent, _)| sent.as_slice() == datagram)
                    .expect("a datagram that was sent");
                assert_eq!(
                    *owner, worker,
                    "datagram {datagram:?} reached worker {worker}"
                );
                received += 1;
            }
        }
        assert_eq!(received, expected.len());

        // Initiations and garbage still arrive (somewhere).
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(&[1; 148], target).unwrap();
        client.send_to(&[9], target).unwrap();
        let arrived = sockets
            .iter()
            .map(|socket| std::iter::from_fn(|| socket.recv_from(&mut buffer).ok()).count())
            .sum::<usize>();
        assert_eq!(arrived, 2);
    }
}
