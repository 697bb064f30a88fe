//! The preamble a router sends first on a bridge connection, one ASCII line:
//! `GEFYRA-BRIDGE/1 <bridge-name> <remote-port>\n`, at most `MAX_LENGTH` bytes with its
//! newline. Stowaway answers nothing; a refused connection is closed. Nothing past the
//! newline is read here: those bytes are the bridged connection's.

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::Refusal;

/// The longest preamble, its newline included.
pub const MAX_LENGTH: usize = 256;
/// What every preamble starts with (the protocol and its version), and the space after.
const START: &[u8] = b"GEFYRA-BRIDGE/1 ";

/// What the router asks for: the GefyraBridge (by name, in Stowaway's namespace) and the
/// container port it bridges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preamble {
    pub bridge: String,
    pub port: u16,
}

/// Parses a preamble line (without its newline), by the one parser of the wire format
/// (`gefyra_api::bridge_wire`, which the router's side writes with).
pub fn parse(line: &[u8]) -> Result<Preamble, Refusal> {
    let mut whole = Vec::with_capacity(line.len() + 1);
    whole.extend_from_slice(line);
    whole.push(b'\n');
    gefyra_api::bridge_wire::parse_preamble(&whole)
        .map(|(bridge, port)| Preamble { bridge, port })
        .map_err(|_| Refusal::MalformedPreamble)
}

/// Whether `start` (the bytes received so far, no newline among them) can still begin a
/// preamble: garbage is refused as soon as it shows, not after the timeout.
fn may_begin_preamble(start: &[u8]) -> bool {
    let shared = start.len().min(START.len());
    start[..shared] == START[..shared]
        && start
            .iter()
            .all(|byte| byte.is_ascii_graphic() || *byte == b' ')
}

/// Reads the preamble from `stream`, up to and including its newline and not a byte
/// further. The caller bounds the time it may take.
pub async fn read(stream: &mut TcpStream) -> Result<Preamble, Refusal> {
    let mut line = [0u8; MAX_LENGTH];
    let mut taken = 0;
    loop {
        let peeked = stream
            .peek(&mut line[taken..])
            .await
            .map_err(|_| Refusal::MalformedPreamble)?;
        if peeked == 0 {
            // Closed before the line ended.
            return Err(Refusal::MalformedPreamble);
        }
        let seen = taken + peeked;
        if let Some(newline) = line[taken..seen].iter().position(|byte| *byte == b'\n') {
            let end = taken + newline;
            stream
                .read_exact(&mut line[taken..=end])
                .await
                .map_err(|_| Refusal::MalformedPreamble)?;
            return parse(&line[..end]);
        }
        if !may_begin_preamble(&line[..seen]) {
            return Err(Refusal::MalformedPreamble);
        }
        // No newline among them: these bytes are all the line's. Taken now, so that the
        // next peek waits for more instead of seeing them again.
        stream
            .read_exact(&mut line[taken..seen])
            .await
            .map_err(|_| Refusal::MalformedPreamble)?;
        taken = seen;
        if taken == MAX_LENGTH {
            return Err(Refusal::OversizedPreamble);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    #[test]
    fn preambles_parse_and_anything_else_is_malformed() {
        assert_eq!(
            parse(b"GEFYRA-BRIDGE/1 b1 80"),
            Ok(Preamble {
                bridge: "b1".into(),
                port: 80
            })
        );
        assert_eq!(
            parse(b"GEFYRA-BRIDGE/1 web-mount.dev-0 65535").map(|p| p.port),
            Ok(65535)
        );
        let longest = format!(
            "GEFYRA-BRIDGE/1 {} 1",
            "a".repeat(gefyra_api::bridge_wire::MAX_BRIDGE_NAME_LEN)
        );
        assert!(parse(longest.as_bytes()).is_ok());
        for bad in [
            "",
            "GEFYRA-BRIDGE/1",
            "GEFYRA-BRIDGE/1 ",
            "GEFYRA-BRIDGE/1 b1",
            "GEFYRA-BRIDGE/1 b1 ",
            "GEFYRA-BRIDGE/1 b1 0",
            "GEFYRA-BRIDGE/1 b1 080",
            "GEFYRA-BRIDGE/1 b1 +80",
            "GEFYRA-BRIDGE/1 b1 65536",
            "GEFYRA-BRIDGE/1 b1 80 ",
            "GEFYRA-BRIDGE/1 b1 80\r",
            "GEFYRA-BRIDGE/1 b1  80",
            "GEFYRA-BRIDGE/1  b1 80",
            "GEFYRA-BRIDGE/1 B1 80",
            "GEFYRA-BRIDGE/1 -b1 80",
            "GEFYRA-BRIDGE/1 b1- 80",
            "GEFYRA-BRIDGE/1 b_1 80",
            "GEFYRA-BRIDGE/1 ../b1 80",
            "GEFYRA-BRIDGE/1 b1 80 extra",
            "GEFYRA-BRIDGE/2 b1 80",
            "gefyra-bridge/1 b1 80",
            "GET / HTTP/1.1",
        ] {
            assert_eq!(
                parse(bad.as_bytes()),
                Err(Refusal::MalformedPreamble),
                "{bad:?}"
            );
        }
        let too_long = format!("GEFYRA-BRIDGE/1 {} 1", "a".repeat(254));
        assert!(parse(too_long.as_bytes()).is_err());
        assert!(parse("GEFYRA-BRIDGE/1 bé 80".as_bytes()).is_err());
        assert!(parse(b"GEFYRA-BRIDGE/1 b\xff 80").is_err());
    }

    /// A connected pair: (what the test writes to, what `read` reads from).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    async fn read_within(stream: &mut TcpStream, millis: u64) -> Option<Result<Preamble, Refusal>> {
        tokio::time::timeout(Duration::from_millis(millis), read(stream))
            .await
            .ok()
    }

    #[tokio::test]
    async fn the_preamble_is_read_up_to_its_newline_and_not_a_byte_further() {
        let (mut router, mut stowaway) = pair().await;
        router
            .write_all(b"GEFYRA-BRIDGE/1 b1 80\nGET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        router.shutdown().await.unwrap();
        // Let everything arrive at once, so one peek sees past the newline.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            read_within(&mut stowaway, 1_000).await,
            Some(Ok(Preamble {
                bridge: "b1".into(),
                port: 80
            }))
        );
        let mut rest = Vec::new();
        stowaway.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn a_preamble_sent_byte_by_byte_is_read_whole() {
        let (mut router, mut stowaway) = pair().await;
        let writer = tokio::spawn(async move {
            for byte in b"GEFYRA-BRIDGE/1 b1 8080\nrest" {
                router.write_all(&[*byte]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            router
        });
        assert_eq!(
            read_within(&mut stowaway, 5_000)
                .await
                .map(|read| read.map(|p| p.port)),
            Some(Ok(8080))
        );
        drop(writer.await.unwrap());
        let mut rest = Vec::new();
        stowaway.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"rest");
    }

    /// Slowloris: a line that never ends holds the reader only as long as its caller's
    /// bound (and it does not spin meanwhile: it waits for bytes).
    #[tokio::test]
    async fn a_line_that_never_ends_is_cut_by_the_callers_bound() {
        let (mut router, mut stowaway) = pair().await;
        router.write_all(b"GEFYRA-BRIDGE/1 b").await.unwrap();
        assert_eq!(read_within(&mut stowaway, 200).await, None, "still waiting");
        drop(router);
    }

    /// What `read` makes of `sent` (then the sender closes if `close`).
    async fn read_of(sent: &[u8], close: bool) -> Option<Result<u16, Refusal>> {
        let (mut router, mut stowaway) = pair().await;
        router.write_all(sent).await.unwrap();
        if close {
            router.shutdown().await.unwrap();
        }
        let read = read_within(&mut stowaway, 1_000).await;
        read.map(|read| read.map(|preamble| preamble.port))
    }

    #[tokio::test]
    async fn garbage_oversized_and_cut_preambles_are_refused() {
        // The longest name with a five-digit port ends exactly at the bound.
        let at_bound = format!(
            "GEFYRA-BRIDGE/1 {} 12345\n",
            "a".repeat(MAX_LENGTH - START.len() - 7)
        );
        let past_bound = format!(
            "GEFYRA-BRIDGE/1 {} 12345\n",
            "a".repeat(MAX_LENGTH - START.len() - 6)
        );
        let no_newline = format!("GEFYRA-BRIDGE/1 {}", "a".repeat(400));
        // What, the bytes sent, whether the sender closes then, what `read` makes of it.
        type Case<'a> = (&'a str, &'a [u8], bool, Result<u16, Refusal>);
        let cases: [Case; 6] = [
            // Garbage is refused as soon as it shows, without waiting for a newline.
            (
                "HTTP",
                b"GET / HTTP/1.1",
                false,
                Err(Refusal::MalformedPreamble),
            ),
            (
                "a control byte",
                b"GEFYRA-BRIDGE/1 b1\x00",
                false,
                Err(Refusal::MalformedPreamble),
            ),
            (
                "no newline within the bound",
                no_newline.as_bytes(),
                false,
                Err(Refusal::OversizedPreamble),
            ),
            (
                "the newline the bound's last byte",
                at_bound.as_bytes(),
                false,
                Ok(12345),
            ),
            (
                "the newline one byte past the bound",
                past_bound.as_bytes(),
                false,
                Err(Refusal::OversizedPreamble),
            ),
            (
                "closed before the newline",
                b"GEFYRA-BRIDGE/1 b1 80",
                true,
                Err(Refusal::MalformedPreamble),
            ),
        ];
        for (what, sent, close, expected) in cases {
            assert_eq!(read_of(sent, close).await, Some(expected), "{what}");
        }
    }
}
