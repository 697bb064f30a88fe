//! The port specs of `connect --userspace` on the command line: `-L` local forwards, written
//! as ssh writes them, and `--expose`, a port of this machine offered to the cluster.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use super::proxy::{Target, parse_port};

const FORWARD_FORMS: &str = "use [BINDADDR:]LOCALPORT:HOST:PORT, e.g. 8080:web:80, \
                             0.0.0.0:8080:10.0.0.7:80 or [::1]:8080:[fd00::7]:80";

/// A local port forward, `-L [BINDADDR:]LOCALPORT:HOST:PORT`: connections to `bind` on this
/// machine (127.0.0.1 unless a BINDADDR is given) go through the tunnel to `host:port` in
/// the cluster. `host` is a name the cluster resolves or an IP address (IPv6 without
/// brackets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalForward {
    pub bind: SocketAddr,
    pub host: String,
    pub port: u16,
}

impl FromStr for LocalForward {
    type Err = String;

    fn from_str(text: &str) -> Result<LocalForward, String> {
        let wrong = |problem: String| format!("-L {text:?}: {problem}; {FORWARD_FORMS}");
        let fields = fields(text).map_err(wrong)?;
        let (bind, local, host, port) = match fields.as_slice() {
            [local, host, port] => (None, *local, *host, *port),
            [bind, local, host, port] => (Some(*bind), *local, *host, *port),
            _ => {
                let hint = if fields.len() > 4 {
                    " (an IPv6 address goes in brackets)"
                } else {
                    ""
                };
                return Err(wrong(format!(
                    "{} fields separated by ':', not 3 or 4{hint}",
                    fields.len()
                )));
            }
        };
        let bind = match bind {
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(bind) => bind_address(bind).map_err(wrong)?,
        };
        let local = parse_port(local).map_err(wrong)?;
        let port = parse_port(port).map_err(wrong)?;
        let host = match Target::new(host, port).map_err(wrong)? {
            Target::Address(address) => address.ip().to_string(),
            Target::Name { host, .. } => host,
        };
        Ok(LocalForward {
            bind: SocketAddr::new(bind, local),
            host,
            port,
        })
    }
}

/// `text` cut at each colon outside brackets: `[::1]:8080:web:80` is `[::1]`, `8080`, `web`
/// and `80`.
fn fields(text: &str) -> Result<Vec<&str>, String> {
    let mut fields = Vec::new();
    let mut rest = text;
    loop {
        let end = if rest.starts_with('[') {
            let close = rest
                .find(']')
                .ok_or_else(|| format!("{rest:?} opens a bracket and does not close it"))?;
            close + 1
        } else {
            rest.find(':').unwrap_or(rest.len())
        };
        let (field, after) = rest.split_at(end);
        fields.push(field);
        if after.is_empty() {
            return Ok(fields);
        }
        rest = after
            .strip_prefix(':')
            .ok_or_else(|| format!("{after:?} follows {field} where a ':' belongs"))?;
    }
}

/// The address a forward listens on: an IPv4 address, an IPv6 address in brackets,
/// `localhost`, or `*` for every interface (as ssh has it).
fn bind_address(text: &str) -> Result<IpAddr, String> {
    match text {
        "*" => Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        "localhost" => Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        _ => match text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            Some(inner) => inner.parse::<Ipv6Addr>().map(IpAddr::V6).ok(),
            None => text.parse::<Ipv4Addr>().map(IpAddr::V4).ok(),
        }
        .ok_or_else(|| {
            format!(
                "{text:?} is not a bind address (an IPv4 address, an IPv6 address in \
                 brackets, localhost, or * for every interface)"
            )
        }),
    }
}

/// A port of this machine offered to the cluster, `--expose [REMOTE:]LOCAL`, remote first as
/// in `bridge create -p REMOTE:LOCAL`: connections from the cluster to port `remote` of this
/// client's tunnel address reach port `local` on this machine's 127.0.0.1. A single port is
/// both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expose {
    pub remote: u16,
    pub local: u16,
}

impl FromStr for Expose {
    type Err = String;

    fn from_str(text: &str) -> Result<Expose, String> {
        let wrong = |problem: String| {
            format!(
                "--expose {text:?}: {problem}; use LOCAL or REMOTE:LOCAL, the port on the tunnel \
                 address then the one on this machine's 127.0.0.1 (e.g. 8080 or 80:8080)"
            )
        };
        match text.split_once(':') {
            None => {
                let port = parse_port(text).map_err(wrong)?;
                Ok(Expose {
                    remote: port,
                    local: port,
                })
            }
            Some((remote, local)) => Ok(Expose {
                remote: parse_port(remote).map_err(wrong)?,
                local: parse_port(local).map_err(wrong)?,
            }),
        }
    }
}

/// Each port of the tunnel address exposed once: it can lead to only one local port.
pub fn check_exposes(exposes: &[Expose]) -> Result<(), String> {
    for (index, expose) in exposes.iter().enumerate() {
        if let Some(earlier) = exposes[..index]
            .iter()
            .find(|earlier| earlier.remote == expose.remote)
        {
            return Err(format!(
                "--expose {}:{} and --expose {}:{} both expose port {} of the tunnel address: \
                 one local port per exposed port",
                earlier.remote, earlier.local, expose.remote, expose.local, expose.remote
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(bind: &str, host: &str, port: u16) -> LocalForward {
        LocalForward {
            bind: bind.parse().unwrap(),
            host: host.to_string(),
            port,
        }
    }

    #[test]
    fn local_forwards_read_like_ssh() {
        for (text, expected) in [
            ("8080:web:80", forward("127.0.0.1:8080", "web", 80)),
            (
                "8080:web.default.svc.cluster.local:80",
                forward("127.0.0.1:8080", "web.default.svc.cluster.local", 80),
            ),
            (
                "8080:10.0.0.7:80",
                forward("127.0.0.1:8080", "10.0.0.7", 80),
            ),
            (
                "8080:[fd00::7]:80",
                forward("127.0.0.1:8080", "fd00::7", 80),
            ),
            ("0.0.0.0:8080:web:80", forward("0.0.0.0:8080", "web", 80)),
            (
                "192.168.1.5:65535:web:1",
                forward("192.168.1.5:65535", "web", 1),
            ),
            ("[::1]:8080:web:80", forward("[::1]:8080", "web", 80)),
            (
                "[::]:8443:[fd00::7]:443",
                forward("[::]:8443", "fd00::7", 443),
            ),
            ("*:8080:web:80", forward("0.0.0.0:8080", "web", 80)),
            (
                "localhost:8080:web:80",
                forward("127.0.0.1:8080", "web", 80),
            ),
        ] {
            assert_eq!(text.parse::<LocalForward>(), Ok(expected), "{text}");
        }
    }

    #[test]
    fn local_forward_errors_say_what_is_wrong_and_the_form() {
        for (text, says) in [
            ("", "1 fields"),
            ("8080", "1 fields"),
            ("8080:web", "2 fields"),
            ("1:2:3:4:5", "5 fields"),
            ("8080:fd00::7:80", "in brackets"),
            ("0:web:80", "\"0\" is not a port"),
            ("8080:web:0", "\"0\" is not a port"),
            ("70000:web:80", "\"70000\" is not a port"),
            ("8080:web:http", "\"http\" is not a port"),
            ("8080:web:", "\"\" is not a port"),
            ("8080::80", "the host name is empty"),
            (
                "8080:web server:80",
                "neither an IP address nor a host name",
            ),
            ("8080:[web]:80", "not an IPv6 address in brackets"),
            ("8080:[fd00::7:80", "does not close it"),
            ("8080:[fd00::7]x:80", "where a ':' belongs"),
            (
                "::1:8080:web:80",
                "6 fields separated by ':', not 3 or 4 (an IPv6 address goes in",
            ),
            ("[::1:8080:web:80", "does not close it"),
            ("[127.0.0.1]:8080:web:80", "not a bind address"),
            ("example.com:8080:web:80", "not a bind address"),
            (":8080:web:80", "not a bind address"),
        ] {
            let error = text.parse::<LocalForward>().unwrap_err();
            assert!(error.contains(says), "{text}: {error}");
            assert!(error.starts_with(&format!("-L {text:?}: ")), "{error}");
            assert!(error.ends_with(FORWARD_FORMS), "{error}");
        }
    }

    #[test]
    fn exposes_are_remote_then_local() {
        assert_eq!(
            "8080".parse(),
            Ok(Expose {
                remote: 8080,
                local: 8080
            })
        );
        assert_eq!(
            "80:8080".parse(),
            Ok(Expose {
                remote: 80,
                local: 8080
            })
        );
        for (text, says) in [
            ("", "\"\" is not a port"),
            ("0", "\"0\" is not a port"),
            ("65536", "\"65536\" is not a port"),
            ("80:", "\"\" is not a port"),
            (":80", "\"\" is not a port"),
            ("80:0", "\"0\" is not a port"),
            ("1:2:3", "\"2:3\" is not a port"),
            ("http", "\"http\" is not a port"),
            ("-80", "\"-80\" is not a port"),
        ] {
            let error = text.parse::<Expose>().unwrap_err();
            assert!(error.contains(says), "{text}: {error}");
            assert!(error.contains("REMOTE:LOCAL"), "{error}");
        }
    }

    #[test]
    fn each_remote_port_is_exposed_once() {
        let expose = |remote, local| Expose { remote, local };
        assert_eq!(check_exposes(&[]), Ok(()));
        // Two ports of the tunnel address may lead to the same local port.
        assert_eq!(
            check_exposes(&[expose(80, 8080), expose(8080, 8080), expose(443, 8443)]),
            Ok(())
        );
        assert_eq!(
            check_exposes(&[expose(80, 8080), expose(443, 8443), expose(80, 9090)]),
            Err(
                "--expose 80:8080 and --expose 80:9090 both expose port 80 of the tunnel \
                 address: one local port per exposed port"
                    .to_string()
            )
        );
    }
}
