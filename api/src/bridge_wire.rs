//! The line the router (gefyra-carrier) sends first on each TCP connection it opens to
//! Stowaway's bridge port, naming the bridge and the container port whose traffic follows:
//! `GEFYRA-BRIDGE/1 <bridge-name> <remote-port>\n`, ASCII, at most [`MAX_PREAMBLE_LEN`] bytes.
//! Stowaway answers nothing and closes the connection when it refuses the line.

/// The protocol token that starts every preamble.
pub const PREAMBLE_MAGIC: &str = "GEFYRA-BRIDGE/1";
/// The longest preamble, `\n` included: a reader gives up after this many bytes.
pub const MAX_PREAMBLE_LEN: usize = 256;
/// The longest bridge name that fits: 256 - "GEFYRA-BRIDGE/1 " - " 65535\n".
pub const MAX_BRIDGE_NAME_LEN: usize = MAX_PREAMBLE_LEN - PREAMBLE_MAGIC.len() - 1 - 7;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreambleError {
    #[error("the preamble does not end with a newline within {MAX_PREAMBLE_LEN} bytes")]
    Unterminated,
    #[error("the preamble does not start with \"{PREAMBLE_MAGIC} \"")]
    Magic,
    #[error(
        "the bridge name is not a Kubernetes object name of at most {MAX_BRIDGE_NAME_LEN} characters"
    )]
    Name,
    #[error("the port is not a decimal number in 1..=65535")]
    Port,
}

/// The preamble for `bridge`'s traffic of container port `remote_port`. Fails for a name no
/// preamble can carry (not a DNS subdomain, or longer than [`MAX_BRIDGE_NAME_LEN`]) and for
/// port 0.
pub fn preamble(bridge: &str, remote_port: u16) -> Result<String, PreambleError> {
    if !is_object_name(bridge.as_bytes()) {
        return Err(PreambleError::Name);
    }
    if remote_port == 0 {
        return Err(PreambleError::Port);
    }
    Ok(format!("{PREAMBLE_MAGIC} {bridge} {remote_port}\n"))
}

/// Where the preamble in `received` ends (the index after its `\n`), once it has all arrived;
/// `Ok(None)` while more bytes are needed. A reader calls it after each read and passes
/// `&received[..end]` to [`parse_preamble`]; the bytes after `end` are the bridged stream.
pub fn preamble_end(received: &[u8]) -> Result<Option<usize>, PreambleError> {
    let window = &received[..received.len().min(MAX_PREAMBLE_LEN)];
    match window.iter().position(|b| *b == b'\n') {
        Some(newline) => Ok(Some(newline + 1)),
        None if received.len() >= MAX_PREAMBLE_LEN => Err(PreambleError::Unterminated),
        None => Ok(None),
    }
}

/// Parses one preamble line, its `\n` included: the bridge name and the remote port.
pub fn parse_preamble(line: &[u8]) -> Result<(String, u16), PreambleError> {
    let body = match line.split_last() {
        Some((b'\n', body)) if line.len() <= MAX_PREAMBLE_LEN => body,
        _ => return Err(PreambleError::Unterminated),
    };
    let rest = body
        .strip_prefix(PREAMBLE_MAGIC.as_bytes())
        .and_then(|rest| rest.strip_prefix(b" "))
        .ok_or(PreambleError::Magic)?;
    let mut fields = rest.split(|b| *b == b' ');
    let (Some(name), Some(port), None) = (fields.next(), fields.next(), fields.next()) else {
        return Err(PreambleError::Name);
    };
    if !is_object_name(name) {
        return Err(PreambleError::Name);
    }
    let port = parse_port(port).ok_or(PreambleError::Port)?;
    // is_object_name admits ASCII only, so this is valid UTF-8.
    let name = String::from_utf8_lossy(name).into_owned();
    Ok((name, port))
}

/// Canonical decimal (no sign, no leading zero) in 1..=65535.
fn parse_port(text: &[u8]) -> Option<u16> {
    if text.is_empty() || text.len() > 5 || text[0] == b'0' {
        return None;
    }
    text.iter()
        .try_fold(0u32, |port, b| {
            b.is_ascii_digit().then(|| port * 10 + u32::from(b - b'0'))
        })
        .and_then(|port| u16::try_from(port).ok())
}

/// An RFC 1123 DNS subdomain (Kubernetes object names), bounded to what fits the preamble.
fn is_object_name(name: &[u8]) -> bool {
    let alphanumeric = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !name.is_empty()
        && name.len() <= MAX_BRIDGE_NAME_LEN
        && name.split(|b| *b == b'.').all(|label| {
            label.first().is_some_and(alphanumeric)
                && label.last().is_some_and(alphanumeric)
                && label.iter().all(|b| alphanumeric(b) || *b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preamble_round_trips() {
        let line = preamble("b1", 8080).expect("valid");
        assert_eq!(line, "GEFYRA-BRIDGE/1 b1 8080\n");
        assert_eq!(
            parse_preamble(line.as_bytes()),
            Ok(("b1".to_string(), 8080))
        );

        let longest = format!("{}.b", "a".repeat(MAX_BRIDGE_NAME_LEN - 2));
        let line = preamble(&longest, 65535).expect("the longest name fits");
        assert_eq!(line.len(), MAX_PREAMBLE_LEN);
        assert_eq!(parse_preamble(line.as_bytes()), Ok((longest, 65535)));
        assert_eq!(preamble_end(line.as_bytes()), Ok(Some(MAX_PREAMBLE_LEN)));
    }

    #[test]
    fn preamble_refuses_what_it_cannot_carry() {
        assert_eq!(preamble("b1", 0), Err(PreambleError::Port));
        let too_long = "a".repeat(MAX_BRIDGE_NAME_LEN + 1);
        for name in [
            "",
            "B1",
            "b 1",
            "b\n1",
            "-b",
            "b-",
            "a..b",
            ".b",
            too_long.as_str(),
        ] {
            assert_eq!(preamble(name, 80), Err(PreambleError::Name), "{name:?}");
        }
    }

    #[test]
    fn preamble_end_waits_then_finds_or_gives_up() {
        assert_eq!(preamble_end(b""), Ok(None));
        assert_eq!(preamble_end(b"GEFYRA-BRIDGE/1 b1 80"), Ok(None));
        assert_eq!(
            preamble_end(b"GEFYRA-BRIDGE/1 b1 80\nGET / HTTP/1.1"),
            Ok(Some(22))
        );
        assert_eq!(
            preamble_end(&[b'x'; MAX_PREAMBLE_LEN]),
            Err(PreambleError::Unterminated)
        );
        let mut late = vec![b'x'; MAX_PREAMBLE_LEN];
        late.push(b'\n');
        assert_eq!(preamble_end(&late), Err(PreambleError::Unterminated));
    }

    #[test]
    fn parse_refuses_malformed_lines() {
        let cases: [(&[u8], PreambleError); 17] = [
            (b"", PreambleError::Unterminated),
            (b"GEFYRA-BRIDGE/1 b1 80", PreambleError::Unterminated),
            (b"GEFYRA-BRIDGE/1 b1 80\r", PreambleError::Unterminated),
            (b"GEFYRA-BRIDGE/2 b1 80\n", PreambleError::Magic),
            (b"gefyra-bridge/1 b1 80\n", PreambleError::Magic),
            (b"GEFYRA-BRIDGE/1b1 80\n", PreambleError::Magic),
            (b"GET / HTTP/1.1\n", PreambleError::Magic),
            (b"GEFYRA-BRIDGE/1 b1 80\r\n", PreambleError::Port),
            (b"GEFYRA-BRIDGE/1 b1  80\n", PreambleError::Name),
            (b"GEFYRA-BRIDGE/1 b1 80 x\n", PreambleError::Name),
            (b"GEFYRA-BRIDGE/1 b1\n", PreambleError::Name),
            (b"GEFYRA-BRIDGE/1 B1 80\n", PreambleError::Name),
            (b"GEFYRA-BRIDGE/1 \xff 80\n", PreambleError::Name),
            (b"GEFYRA-BRIDGE/1 b1 0\n", PreambleError::Port),
            (b"GEFYRA-BRIDGE/1 b1 080\n", PreambleError::Port),
            (b"GEFYRA-BRIDGE/1 b1 65536\n", PreambleError::Port),
            (b"GEFYRA-BRIDGE/1 b1 +80\n", PreambleError::Port),
        ];
        for (line, expected) in cases {
            assert_eq!(
                parse_preamble(line),
                Err(expected),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        let mut long = b"GEFYRA-BRIDGE/1 ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 300));
        long.extend(b" 80\n");
        assert_eq!(parse_preamble(&long), Err(PreambleError::Unterminated));
    }
}
