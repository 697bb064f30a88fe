//! The server side of the two proxy handshakes `connect --userspace` offers: SOCKS5 (RFC
//! 1928; CONNECT only, no authentication) and HTTP CONNECT (RFC 9110 §9.3.6). Each reads
//! exactly its handshake and not a byte more, so what the client sends next (a TLS
//! ClientHello, say) is left in the stream for the tunnel. The caller connects to the
//! [`Target`] and then writes the reply ([`socks5_reply`], [`http_connect_reply`]); a request
//! the handshake refuses has been answered already.
//!
//! Everything read is the client's: reads are bounded, lengths come from fixed-size buffers,
//! nothing panics. Neither handshake has a deadline of its own: the caller bounds its time.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use gefyra_api::connection::{Endpoint, is_dns_name};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Where a proxy client wants to connect: an address, or a name the cluster resolves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Address(SocketAddr),
    Name { host: String, port: u16 },
}

impl Target {
    /// `host` (a host name, an IP address, or an IPv6 address in brackets) and `port`
    /// (1-65535) as a target.
    pub fn new(host: &str, port: u16) -> Result<Target, String> {
        let port = connectable(port)?;
        if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            return inner
                .parse::<Ipv6Addr>()
                .map(|ip| Target::Address(SocketAddr::new(ip.into(), port)))
                .map_err(|_| format!("{host:?} is not an IPv6 address in brackets"));
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Target::Address(SocketAddr::new(ip, port)));
        }
        if host.is_empty() {
            return Err("the host name is empty".to_string());
        }
        if !is_dns_name(host) {
            return Err(format!(
                "{host:?} is neither an IP address nor a host name (dot-separated labels of \
                 letters, digits and inner hyphens, 253 characters at most)"
            ));
        }
        Ok(Target::Name {
            host: host.to_string(),
            port,
        })
    }
}

/// The authority form, `host:port` or `[v6]:port`, as an HTTP CONNECT request names it.
impl FromStr for Target {
    type Err = String;

    fn from_str(text: &str) -> Result<Target, String> {
        let authority: Endpoint = text.parse()?;
        Target::new(&authority.host, authority.port)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Address(address) => write!(f, "{address}"),
            Target::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// A port written in decimal digits, 1-65535.
pub(crate) fn parse_port(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .ok()
        .filter(|port| *port != 0 && text.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| format!("{text:?} is not a port (1-65535)"))
}

/// `port` unless it is 0, which nothing can connect to.
fn connectable(port: u16) -> Result<u16, String> {
    if port == 0 {
        Err("port 0 cannot be connected to".to_string())
    } else {
        Ok(port)
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Reading from or writing to the client failed.
    #[error("the proxy client's connection failed: {0}")]
    Io(#[from] io::Error),
    /// The client did not follow the protocol (and may not have been told).
    #[error("the proxy client broke the protocol: {0}")]
    Protocol(String),
    /// The client asked for what this proxy does not do; it has been answered so.
    #[error("the proxy refused a request: {0}")]
    Refused(String),
}

/// Fills `buf`; the client closing the connection first is a protocol error naming `part`.
async fn read_part<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
    part: &str,
) -> Result<(), ProxyError> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Err(ProxyError::Protocol(
            format!("the client closed the connection in the middle of {part}"),
        )),
        Err(error) => Err(error.into()),
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> Result<(), ProxyError> {
    stream.write_all(bytes).await?;
    stream.flush().await?;
    Ok(())
}

/// Answers a refused request with `answer`, then fails with `error`. Should the answer not
/// reach the client, `error` still says what went wrong first, so it is the one returned.
async fn refuse<S: AsyncWrite + Unpin, T>(
    stream: &mut S,
    answer: &[u8],
    error: ProxyError,
) -> Result<T, ProxyError> {
    let _unreachable_client = send(stream, answer).await;
    Err(error)
}

const SOCKS_VERSION: u8 = 0x05;
const NO_AUTHENTICATION: u8 = 0x00;
const NO_ACCEPTABLE_METHOD: u8 = 0xFF;
const CONNECT: u8 = 0x01;
const BIND: u8 = 0x02;
const UDP_ASSOCIATE: u8 = 0x03;
const ADDRESS_IPV4: u8 = 0x01;
const ADDRESS_NAME: u8 = 0x03;
const ADDRESS_IPV6: u8 = 0x04;
const COMMAND_NOT_SUPPORTED: u8 = 0x07;
const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;

/// The outcome of a SOCKS5 CONNECT, as its reply code (RFC 1928 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Socks5Reply {
    Succeeded = 0x00,
    GeneralFailure = 0x01,
    NotAllowed = 0x02,
    NetworkUnreachable = 0x03,
    HostUnreachable = 0x04,
    ConnectionRefused = 0x05,
    TtlExpired = 0x06,
}

/// The SOCKS5 reply to a CONNECT with `outcome`; the bound address is 0.0.0.0:0, as the
/// tunnel's own address says nothing useful to the client.
pub fn socks5_reply(outcome: Socks5Reply) -> Vec<u8> {
    socks5_reply_code(outcome as u8).to_vec()
}

fn socks5_reply_code(code: u8) -> [u8; 10] {
    [SOCKS_VERSION, code, 0x00, ADDRESS_IPV4, 0, 0, 0, 0, 0, 0]
}

/// Reads a SOCKS5 greeting and CONNECT request (RFC 1928) and returns where the client wants
/// to go. Only "no authentication" and CONNECT are accepted; anything else is answered with
/// the reply the RFC has for it, and fails. The success (or connect failure) reply is the
/// caller's to write, with [`socks5_reply`].
pub async fn socks5_handshake<S>(stream: &mut S) -> Result<Target, ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    socks5_method(stream).await?;
    socks5_request(stream).await
}

/// The greeting: version, the methods offered; "no authentication" is chosen or none is.
async fn socks5_method<S>(stream: &mut S) -> Result<(), ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut header = [0u8; 2];
    read_part(stream, &mut header, "the SOCKS5 greeting").await?;
    let [version, count] = header;
    if version != SOCKS_VERSION {
        return Err(ProxyError::Protocol(not_socks5(version)));
    }
    let mut offered = [0u8; 255];
    let offered = &mut offered[..usize::from(count)];
    read_part(stream, offered, "the SOCKS5 greeting").await?;
    if offered.contains(&NO_AUTHENTICATION) {
        return send(stream, &[SOCKS_VERSION, NO_AUTHENTICATION]).await;
    }
    refuse(
        stream,
        &[SOCKS_VERSION, NO_ACCEPTABLE_METHOD],
        ProxyError::Refused(
            "the SOCKS5 client insists on authentication (a user name and password?); this \
             proxy has none: configure the client without"
                .to_string(),
        ),
    )
    .await
}

/// What a first byte other than 5 says about the client.
fn not_socks5(version: u8) -> String {
    match version {
        4 => "a SOCKS4 request; this proxy speaks SOCKS5 (socks5h://)".to_string(),
        b'A'..=b'Z' => {
            "an HTTP request sent to the SOCKS5 proxy; use the HTTP CONNECT proxy for HTTP"
                .to_string()
        }
        other => format!("version byte {other}, not 5: the client does not speak SOCKS5"),
    }
}

/// The address of a SOCKS5 request, as sent: checked once the port is read too.
enum RequestedHost {
    Ip(IpAddr),
    Name(Vec<u8>),
}

/// The request: version, command, reserved, then the address and port.
async fn socks5_request<S>(stream: &mut S) -> Result<Target, ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let general_failure = socks5_reply_code(Socks5Reply::GeneralFailure as u8);
    let mut header = [0u8; 4];
    read_part(stream, &mut header, "the SOCKS5 request").await?;
    // The reserved byte (the third) is ignored: it carries nothing.
    let [version, command, _, address_type] = header;
    if version != SOCKS_VERSION {
        let error = format!("the request's version byte is {version}, not 5");
        return refuse(stream, &general_failure, ProxyError::Protocol(error)).await;
    }
    if command != CONNECT {
        let name = match command {
            BIND => "BIND".to_string(),
            UDP_ASSOCIATE => "UDP ASSOCIATE".to_string(),
            other => format!("command {other}"),
        };
        let error = format!("SOCKS5 {name} is not supported: this proxy only connects (CONNECT)");
        let answer = socks5_reply_code(COMMAND_NOT_SUPPORTED);
        return refuse(stream, &answer, ProxyError::Refused(error)).await;
    }
    let host = match address_type {
        ADDRESS_IPV4 => {
            let mut octets = [0u8; 4];
            read_part(stream, &mut octets, "the SOCKS5 request").await?;
            RequestedHost::Ip(Ipv4Addr::from(octets).into())
        }
        ADDRESS_IPV6 => {
            let mut octets = [0u8; 16];
            read_part(stream, &mut octets, "the SOCKS5 request").await?;
            RequestedHost::Ip(Ipv6Addr::from(octets).into())
        }
        ADDRESS_NAME => {
            let mut length = [0u8; 1];
            read_part(stream, &mut length, "the SOCKS5 request").await?;
            let mut name = [0u8; 255];
            let name = &mut name[..usize::from(length[0])];
            read_part(stream, name, "the SOCKS5 request").await?;
            RequestedHost::Name(name.to_vec())
        }
        other => {
            let error = format!("unknown SOCKS5 address type {other}");
            let answer = socks5_reply_code(ADDRESS_TYPE_NOT_SUPPORTED);
            return refuse(stream, &answer, ProxyError::Protocol(error)).await;
        }
    };
    let mut port = [0u8; 2];
    read_part(stream, &mut port, "the SOCKS5 request").await?;
    let port = u16::from_be_bytes(port);
    let target = match host {
        RequestedHost::Ip(ip) => {
            connectable(port).map(|port| Target::Address(SocketAddr::new(ip, port)))
        }
        RequestedHost::Name(name) => match String::from_utf8(name) {
            Ok(name) => Target::new(&name, port),
            Err(_) => Err("the host name is not UTF-8 text".to_string()),
        },
    };
    match target {
        Ok(target) => Ok(target),
        Err(error) => refuse(stream, &general_failure, ProxyError::Refused(error)).await,
    }
}

/// The longest request head read; a longer one is answered 431.
const MAX_HEAD: usize = 8 * 1024;
/// The most header fields a head may have; more is answered 431.
const MAX_HEADERS: usize = 64;

const NOT_CONNECT: &str =
    "this is an HTTP CONNECT proxy; use it as an https/CONNECT proxy or the SOCKS5 proxy";

/// The reply to an HTTP CONNECT once the caller has tried the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpReply {
    /// 200: the tunnel is open; what follows is the target's.
    Established,
    /// 502: the target could not be connected to, for this reason.
    BadGateway(String),
    /// 504: connecting to the target took too long.
    GatewayTimeout,
    /// 403: the target is not allowed, for this reason.
    Forbidden(String),
}

/// The HTTP/1.1 response for `status`: the bare 200 that opens the tunnel, or an error with
/// a one-line text body that closes the connection.
pub fn http_connect_reply(status: HttpReply) -> Vec<u8> {
    match status {
        HttpReply::Established => b"HTTP/1.1 200 Connection established\r\n\r\n".to_vec(),
        HttpReply::BadGateway(reason) => http_error("502 Bad Gateway", "", &reason),
        HttpReply::GatewayTimeout => http_error(
            "504 Gateway Timeout",
            "",
            "connecting to the target timed out",
        ),
        HttpReply::Forbidden(reason) => http_error("403 Forbidden", "", &reason),
    }
}

/// An error response: `status`, any `extra` header lines (each ending in CRLF), and `body`
/// on one line.
fn http_error(status: &str, extra: &str, body: &str) -> Vec<u8> {
    // A reason may hold a name the client sent: it must not break the body's one line.
    let body: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .chain(['\n'])
        .collect();
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         {extra}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads an HTTP/1.x request head, up to and including the empty line that ends it, and
/// returns the target of its CONNECT. Another method is answered 405, a malformed head 400,
/// one over 8 KiB (or with over 64 fields) 431, and each fails. The 200 (or failure) reply
/// is the caller's to write, with [`http_connect_reply`].
pub async fn http_connect_handshake<S>(stream: &mut S) -> Result<Target, ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let too_large = "431 Request Header Fields Too Large";
    let Some(head) = read_head(stream).await? else {
        let error = format!("the request head is over {MAX_HEAD} bytes");
        let answer = http_error(too_large, "", &error);
        return refuse(stream, &answer, ProxyError::Protocol(error)).await;
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let (method, target) = match request.parse(&head) {
        Ok(httparse::Status::Complete(_)) => match (request.method, request.path) {
            (Some(method), Some(target)) => (method, target),
            _ => return bad_request(stream, "a malformed request line").await,
        },
        Err(httparse::Error::TooManyHeaders) => {
            let error = format!("a request head with over {MAX_HEADERS} header fields");
            let answer = http_error(too_large, "", &error);
            return refuse(stream, &answer, ProxyError::Protocol(error)).await;
        }
        Ok(httparse::Status::Partial) | Err(_) => {
            return bad_request(stream, "a malformed request head").await;
        }
    };
    if method != "CONNECT" {
        let error = format!("an HTTP {method} request; {NOT_CONNECT}");
        let answer = http_error("405 Method Not Allowed", "Allow: CONNECT\r\n", NOT_CONNECT);
        return refuse(stream, &answer, ProxyError::Refused(error)).await;
    }
    match target.parse::<Target>() {
        Ok(target) => Ok(target),
        Err(problem) => {
            let problem = format!("CONNECT needs host:port ([v6]:port for IPv6): {problem}");
            bad_request(stream, &problem).await
        }
    }
}

async fn bad_request<S: AsyncWrite + Unpin>(
    stream: &mut S,
    problem: &str,
) -> Result<Target, ProxyError> {
    let answer = http_error("400 Bad Request", "", problem);
    refuse(stream, &answer, ProxyError::Protocol(problem.to_string())).await
}

/// The request head, one byte at a time so that nothing after its empty line is read;
/// `None` if it is longer than [`MAX_HEAD`]. A bare LF ends a line too (RFC 9112 §2.2).
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Option<Vec<u8>>, ProxyError> {
    let mut head = Vec::with_capacity(512);
    while head.len() < MAX_HEAD {
        let byte = match stream.read_u8().await {
            Ok(byte) => byte,
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                let when = if head.is_empty() {
                    "before sending a request"
                } else {
                    "in the middle of the request head"
                };
                return Err(ProxyError::Protocol(format!(
                    "the client closed the connection {when}"
                )));
            }
            Err(error) => return Err(error.into()),
        };
        head.push(byte);
        if head.ends_with(b"\n\r\n") || head.ends_with(b"\n\n") {
            return Ok(Some(head));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{DuplexStream, duplex};

    /// A client end that has sent `input` and closed its sending side, and the server end.
    async fn sent(input: &[u8]) -> (DuplexStream, DuplexStream) {
        let (mut client, server) = duplex(64 * 1024);
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        (client, server)
    }

    /// All the server wrote to the client.
    async fn answer(client: &mut DuplexStream) -> Vec<u8> {
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        answer
    }

    /// The handshake's result, what the server wrote, and what it left unread.
    async fn socks5(input: &[u8]) -> (Result<Target, ProxyError>, Vec<u8>, Vec<u8>) {
        let (mut client, mut server) = sent(input).await;
        let result = socks5_handshake(&mut server).await;
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        drop(server);
        (result, answer(&mut client).await, rest)
    }

    async fn http(input: &[u8]) -> (Result<Target, ProxyError>, String, Vec<u8>) {
        let (mut client, mut server) = sent(input).await;
        let result = http_connect_handshake(&mut server).await;
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        drop(server);
        let answer = String::from_utf8(answer(&mut client).await).unwrap();
        (result, answer, rest)
    }

    const GREETING: [u8; 3] = [5, 1, 0];
    const CHOSEN: [u8; 2] = [5, 0];

    fn request(command: u8, address: &[u8], port: u16) -> Vec<u8> {
        let mut bytes = GREETING.to_vec();
        bytes.extend([5, command, 0]);
        bytes.extend(address);
        bytes.extend(port.to_be_bytes());
        bytes
    }

    fn name(name: &[u8]) -> Vec<u8> {
        let mut bytes = vec![ADDRESS_NAME, u8::try_from(name.len()).unwrap()];
        bytes.extend(name);
        bytes
    }

    fn reply(code: u8) -> Vec<u8> {
        let mut bytes = CHOSEN.to_vec();
        bytes.extend(socks5_reply_code(code));
        bytes
    }

    #[tokio::test]
    async fn socks5_connects_to_ipv4_ipv6_and_names() {
        let (result, written, _) = socks5(&request(CONNECT, &[1, 10, 0, 0, 7], 443)).await;
        assert_eq!(
            result.unwrap(),
            Target::Address("10.0.0.7:443".parse().unwrap())
        );
        // Only the method is chosen: the success reply is the caller's.
        assert_eq!(written, CHOSEN);

        let mut v6 = vec![ADDRESS_IPV6];
        v6.extend("fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        let (result, _, _) = socks5(&request(CONNECT, &v6, 8080)).await;
        let target = result.unwrap();
        assert_eq!(target, Target::Address("[fd00::1]:8080".parse().unwrap()));
        assert_eq!(target.to_string(), "[fd00::1]:8080");

        let (result, _, _) = socks5(&request(CONNECT, &name(b"web.default.svc"), 80)).await;
        let target = result.unwrap();
        assert_eq!(
            target,
            Target::Name {
                host: "web.default.svc".to_string(),
                port: 80
            }
        );
        assert_eq!(target.to_string(), "web.default.svc:80");

        // Some clients send an address as a name.
        let (result, _, _) = socks5(&request(CONNECT, &name(b"10.1.2.3"), 80)).await;
        assert_eq!(
            result.unwrap(),
            Target::Address("10.1.2.3:80".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn socks5_chooses_no_authentication_among_several_methods() {
        let mut input = vec![5, 3, 2, 1, 0];
        input.extend(&request(CONNECT, &[1, 127, 0, 0, 1], 22)[GREETING.len()..]);
        let (result, written, _) = socks5(&input).await;
        assert_eq!(
            result.unwrap(),
            Target::Address("127.0.0.1:22".parse().unwrap())
        );
        assert_eq!(written, CHOSEN);
    }

    #[tokio::test]
    async fn socks5_without_no_authentication_is_answered_ff() {
        let (result, written, _) = socks5(&[5, 1, 2]).await;
        assert!(matches!(result, Err(ProxyError::Refused(_))), "{result:?}");
        assert_eq!(written, [5, 0xFF]);

        let (result, written, _) = socks5(&[5, 0]).await;
        assert!(matches!(result, Err(ProxyError::Refused(_))), "{result:?}");
        assert_eq!(written, [5, 0xFF]);
    }

    #[tokio::test]
    async fn socks5_refuses_bind_and_udp_associate_with_07() {
        for command in [BIND, UDP_ASSOCIATE, 9] {
            let (result, written, _) = socks5(&request(command, &[1, 10, 0, 0, 1], 80)).await;
            let Err(ProxyError::Refused(error)) = result else {
                panic!("{result:?}");
            };
            assert!(error.contains("only connects"), "{error}");
            assert_eq!(written, reply(COMMAND_NOT_SUPPORTED), "command {command}");
        }
    }

    #[tokio::test]
    async fn socks5_refuses_an_unknown_address_type_with_08() {
        let (result, written, _) = socks5(&request(CONNECT, &[2, 10, 0, 0, 1], 80)).await;
        assert!(matches!(result, Err(ProxyError::Protocol(_))), "{result:?}");
        assert_eq!(written, reply(ADDRESS_TYPE_NOT_SUPPORTED));
    }

    #[tokio::test]
    async fn socks5_refuses_bad_names_and_port_0_with_01() {
        let labels = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(63),
        ];
        let overlong = labels.join(".");
        assert_eq!(overlong.len(), 255);
        for (address, port) in [
            (name(b""), 80),
            (name(overlong.as_bytes()), 80),
            (name(&"a".repeat(64).into_bytes()), 80),
            (name(b"web svc"), 80),
            (name(b"a..b"), 80),
            (name(b"-web"), 80),
            (name(b"\xff\xfe"), 80),
            (name(b"[10.0.0.1]"), 80),
            (name(b"web"), 0),
            (vec![ADDRESS_IPV4, 10, 0, 0, 1], 0),
        ] {
            let (result, written, _) = socks5(&request(CONNECT, &address, port)).await;
            assert!(
                matches!(result, Err(ProxyError::Refused(_))),
                "{address:?} {port}: {result:?}"
            );
            assert_eq!(written, reply(1), "{address:?} {port}");
        }
        // The longest name DNS allows, with its trailing dot, is fine.
        let longest = format!(
            "{}.{}.{}.{}.",
            labels[0],
            labels[1],
            labels[2],
            "d".repeat(61)
        );
        let (result, _, _) = socks5(&request(CONNECT, &name(longest.as_bytes()), 80)).await;
        assert_eq!(
            result.unwrap(),
            Target::Name {
                host: longest,
                port: 80
            }
        );
    }

    #[tokio::test]
    async fn socks5_fails_without_panicking_on_truncated_input() {
        let whole = request(CONNECT, &name(b"web"), 80);
        for end in 0..whole.len() {
            let (result, _, _) = socks5(&whole[..end]).await;
            let Err(ProxyError::Protocol(error)) = result else {
                panic!("{end}: {result:?}");
            };
            assert!(error.contains("closed the connection"), "{error}");
        }
    }

    #[tokio::test]
    async fn socks5_names_what_a_wrong_first_byte_looks_like() {
        for (input, says) in [
            (&b"\x04\x01\x00\x50"[..], "SOCKS4"),
            (b"CONNECT web:80 HTTP/1.1\r\n\r\n", "HTTP"),
            (b"\x00\x00", "version byte 0"),
        ] {
            let (result, written, _) = socks5(input).await;
            let Err(ProxyError::Protocol(error)) = result else {
                panic!("{result:?}");
            };
            assert!(error.contains(says), "{error}");
            assert!(written.is_empty());
        }
    }

    #[tokio::test]
    async fn socks5_leaves_the_payload_after_the_request() {
        let mut input = request(CONNECT, &name(b"web"), 443);
        input.extend(b"\x16\x03\x01 a ClientHello");
        let (result, _, rest) = socks5(&input).await;
        result.unwrap();
        assert_eq!(rest, b"\x16\x03\x01 a ClientHello");
    }

    #[test]
    fn socks5_replies_carry_the_rfc_codes() {
        for (outcome, code) in [
            (Socks5Reply::Succeeded, 0),
            (Socks5Reply::GeneralFailure, 1),
            (Socks5Reply::NotAllowed, 2),
            (Socks5Reply::NetworkUnreachable, 3),
            (Socks5Reply::HostUnreachable, 4),
            (Socks5Reply::ConnectionRefused, 5),
            (Socks5Reply::TtlExpired, 6),
        ] {
            assert_eq!(socks5_reply(outcome), [5, code, 0, 1, 0, 0, 0, 0, 0, 0]);
        }
    }

    #[tokio::test]
    async fn http_connect_to_a_name_and_to_ipv6() {
        let (result, written, rest) =
            http(b"CONNECT web.default.svc:443 HTTP/1.1\r\nHost: web.default.svc:443\r\n\r\n")
                .await;
        assert_eq!(
            result.unwrap(),
            Target::Name {
                host: "web.default.svc".to_string(),
                port: 443
            }
        );
        assert_eq!(written, "");
        assert!(rest.is_empty());

        let (result, _, _) = http(b"CONNECT [fd00::1]:8443 HTTP/1.0\r\n\r\n").await;
        assert_eq!(
            result.unwrap(),
            Target::Address("[fd00::1]:8443".parse().unwrap())
        );

        let (result, _, _) = http(b"CONNECT 10.0.0.7:22 HTTP/1.1\n\n").await;
        assert_eq!(
            result.unwrap(),
            Target::Address("10.0.0.7:22".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn http_other_methods_are_answered_405() {
        let (result, written, _) = http(b"GET http://web/ HTTP/1.1\r\nHost: web\r\n\r\n").await;
        let Err(ProxyError::Refused(error)) = result else {
            panic!("{result:?}");
        };
        assert!(error.contains("GET"), "{error}");
        let body = format!("{NOT_CONNECT}\n");
        assert_eq!(
            written,
            format!(
                "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\n\
                 Content-Length: {}\r\nAllow: CONNECT\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        );
    }

    #[tokio::test]
    async fn http_an_overlong_head_is_answered_431() {
        let mut input = b"CONNECT web:443 HTTP/1.1\r\nX-Padding: ".to_vec();
        input.extend(vec![b'a'; MAX_HEAD]);
        input.extend(b"\r\n\r\n");
        let (result, written, rest) = http(&input).await;
        assert!(matches!(result, Err(ProxyError::Protocol(_))), "{result:?}");
        assert!(
            written.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{written}"
        );
        // Reading stopped at the limit.
        assert_eq!(rest.len(), input.len() - MAX_HEAD);

        let mut many = b"CONNECT web:443 HTTP/1.1\r\n".to_vec();
        for n in 0..=MAX_HEADERS {
            many.extend(format!("X-{n}: 1\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        let (result, written, _) = http(&many).await;
        assert!(matches!(result, Err(ProxyError::Protocol(_))), "{result:?}");
        assert!(written.starts_with("HTTP/1.1 431 "), "{written}");
    }

    #[tokio::test]
    async fn http_leaves_the_payload_after_the_head() {
        let (result, _, rest) = http(
            b"CONNECT web:443 HTTP/1.1\r\nHost: web:443\r\n\r\n\x16\x03\x01 ClientHello\r\n\r\n",
        )
        .await;
        result.unwrap();
        assert_eq!(rest, b"\x16\x03\x01 ClientHello\r\n\r\n");
    }

    #[tokio::test]
    async fn http_malformed_requests_are_answered_400() {
        for input in [
            &b"CONNECT\r\n\r\n"[..],
            b"CONNECT web:443\r\n\r\n",
            b"CONNECT web:443 HTTP/2.0\r\n\r\n",
            b"CONNECT  web:443 HTTP/1.1\r\n\r\n",
            b"\x00\x01\x02\r\n\r\n",
            b"CONNECT web HTTP/1.1\r\n\r\n",
            b"CONNECT web:0 HTTP/1.1\r\n\r\n",
            b"CONNECT web:65536 HTTP/1.1\r\n\r\n",
            b"CONNECT ::1:443 HTTP/1.1\r\n\r\n",
            b"CONNECT [web]:443 HTTP/1.1\r\n\r\n",
            b"CONNECT http://web:443/ HTTP/1.1\r\n\r\n",
            b"CONNECT web:443 HTTP/1.1\r\nBad Header\r\n\r\n",
            b"\r\n\r\n",
        ] {
            let (result, written, _) = http(input).await;
            assert!(
                matches!(result, Err(ProxyError::Protocol(_))),
                "{input:?}: {result:?}"
            );
            assert!(
                written.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                "{input:?}: {written}"
            );
            assert!(written.ends_with("\n") && written.contains("Connection: close"));
        }
    }

    #[tokio::test]
    async fn http_a_closed_connection_fails_without_an_answer() {
        for input in [&b""[..], b"CONNECT web:443 HTTP/1.1\r\n"] {
            let (result, written, _) = http(input).await;
            let Err(ProxyError::Protocol(error)) = result else {
                panic!("{result:?}");
            };
            assert!(error.contains("closed the connection"), "{error}");
            assert_eq!(written, "");
        }
    }

    #[test]
    fn http_replies() {
        assert_eq!(
            http_connect_reply(HttpReply::Established),
            b"HTTP/1.1 200 Connection established\r\n\r\n"
        );
        let bad_gateway = String::from_utf8(http_connect_reply(HttpReply::BadGateway(
            "connection refused\r\nX-Injected: 1".to_string(),
        )))
        .unwrap();
        let body = "connection refused  X-Injected: 1\n";
        assert_eq!(
            bad_gateway,
            format!(
                "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        );
        let timeout = String::from_utf8(http_connect_reply(HttpReply::GatewayTimeout)).unwrap();
        assert!(timeout.starts_with("HTTP/1.1 504 Gateway Timeout\r\n"));
        assert!(timeout.ends_with("\r\n\r\nconnecting to the target timed out\n"));
        let forbidden =
            String::from_utf8(http_connect_reply(HttpReply::Forbidden("no".to_string()))).unwrap();
        assert!(forbidden.starts_with("HTTP/1.1 403 Forbidden\r\n"));
        assert!(forbidden.contains("Content-Length: 3\r\n"));
    }

    #[test]
    fn targets_in_authority_form() {
        assert_eq!(
            "web:80".parse(),
            Ok(Target::Name {
                host: "web".to_string(),
                port: 80
            })
        );
        assert_eq!(
            "[::1]:80".parse(),
            Ok(Target::Address("[::1]:80".parse().unwrap()))
        );
        for bad in [
            "web",
            ":80",
            "web:",
            "-web:80",
            "::1:80",
            "[::1:80",
            "[1.2.3.4]:80",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn run<F: std::future::Future>(future: F) -> F::Output {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(future)
        }

        fn address() -> impl Strategy<Value = SocketAddr> {
            (any::<IpAddr>(), 1..=u16::MAX).prop_map(|(ip, port)| SocketAddr::new(ip, port))
        }

        proptest! {
            #[test]
            fn socks5_never_panics(input in proptest::collection::vec(any::<u8>(), 0..600)) {
                let (_result, _, _) = run(socks5(&input));
            }

            #[test]
            fn socks5_never_panics_on_requests(tail in proptest::collection::vec(any::<u8>(), 0..300)) {
                let mut input = vec![5, 1, 0, 5, 1, 0];
                input.extend(tail);
                let (_result, _, _) = run(socks5(&input));
            }

            #[test]
            fn http_never_panics(input in proptest::collection::vec(any::<u8>(), 0..10_000)) {
                let (client, mut server) = run(sent(&input));
                let _ = run(http_connect_handshake(&mut server));
                drop(client);
            }

            #[test]
            fn http_never_panics_on_connects(target in proptest::collection::vec(any::<u8>(), 0..300)) {
                let mut input = b"CONNECT ".to_vec();
                input.extend(target);
                input.extend(b" HTTP/1.1\r\n\r\n");
                let (client, mut server) = run(sent(&input));
                let _ = run(http_connect_handshake(&mut server));
                drop(client);
            }

            #[test]
            fn both_handshakes_return_the_address_asked_for(address in address()) {
                let (ip_type, octets) = match address.ip() {
                    IpAddr::V4(ip) => (ADDRESS_IPV4, ip.octets().to_vec()),
                    IpAddr::V6(ip) => (ADDRESS_IPV6, ip.octets().to_vec()),
                };
                let mut field = vec![ip_type];
                field.extend(octets);
                let (result, _, _) = run(socks5(&request(CONNECT, &field, address.port())));
                prop_assert_eq!(result.unwrap(), Target::Address(address));

                let head = format!("CONNECT {address} HTTP/1.1\r\n\r\n");
                let (result, _, _) = run(http(head.as_bytes()));
                prop_assert_eq!(result.unwrap(), Target::Address(address));
            }
        }
    }
}
