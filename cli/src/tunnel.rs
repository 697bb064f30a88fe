//! The developer's end of the tunnel: what it routes, how cluster names resolve, the file
//! `connect -f` writes and the commands it prints. Pure; `connect` does the I/O.
//!
//! A laptop is not Gefyra's Cargo container: routing everything (`0.0.0.0/0`) and every DNS
//! query into the cluster would cut it off from everything else. So by default only the
//! cluster's ranges (`Cluster.AllowedIPs`, published by the operator) go through the tunnel,
//! and only names under the cluster domain are asked of the cluster's resolver.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use gefyra_api::connection::{ProviderConfig, format_allowed_ips, is_dns_name};
use gefyra_api::ipam::SERVER_ADDRESS;
use gefyra_api::wireguard::{ConfigFormat, TunnelConfig};
use ipnet::IpNet;

/// What the tunnel routes, and a warning when that may not be what the developer wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes {
    pub nets: Vec<IpNet>,
    pub warning: Option<String>,
}

/// `--allowed-ips` if given, else the cluster's ranges the operator published; an operator
/// that publishes none gets the server's address only (DNS), with a warning naming the flag.
pub fn routes(requested: &[IpNet], config: &ProviderConfig) -> Routes {
    let server = IpNet::from(SERVER_ADDRESS);
    if !requested.is_empty() {
        let warning = (!requested.iter().any(|net| net.contains(&SERVER_ADDRESS))).then(|| {
            format!(
                "--allowed-ips leaves out {SERVER_ADDRESS}, the cluster's DNS server: cluster names will not resolve"
            )
        });
        return Routes {
            nets: requested.to_vec(),
            warning,
        };
    }
    if config.cluster_ranges.is_empty() {
        return Routes {
            nets: vec![server],
            warning: Some(format!(
                "the operator does not publish the cluster's ranges (Cluster.AllowedIPs; it is older than this CLI): only {SERVER_ADDRESS} is routed; pass --allowed-ips with your cluster's Service and Pod CIDRs, e.g. --allowed-ips {SERVER_ADDRESS}/32,10.96.0.0/12,10.244.0.0/16"
            )),
        };
    }
    Routes {
        nets: config.cluster_ranges.clone(),
        warning: None,
    }
}

/// Whether `nets` hold a default route (`0.0.0.0/0` or `::/0`): a full tunnel.
pub fn is_full_tunnel(nets: &[IpNet]) -> bool {
    nets.iter().any(|net| net.prefix_len() == 0)
}

/// A cluster DNS domain such as `cluster.local` (checked: it goes into a shell command).
pub fn parse_cluster_domain(text: &str) -> Result<String, String> {
    let domain = text.trim_end_matches('.');
    if is_dns_name(domain) {
        Ok(domain.to_ascii_lowercase())
    } else {
        Err(format!(
            "{text:?} is not a DNS domain such as cluster.local"
        ))
    }
}

/// How names resolve while the tunnel is up (wg-quick files only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dns {
    /// Every query goes to the cluster (`DNS = 192.168.99.1`), as in Gefyra: a full tunnel.
    Everything,
    /// Names under this domain go to the cluster, others keep the machine's resolver.
    ClusterDomain(String),
}

/// The WireGuard configuration `connect -f` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTunnel {
    pub tunnel: TunnelConfig,
    pub dns: Dns,
}

impl LocalTunnel {
    /// The file's text; it holds the private key, so it is written `0600`.
    pub fn render(&self, format: ConfigFormat) -> String {
        // The keys, the peer and its AllowedIPs are TunnelConfig's; wg-quick's lines are
        // added to its [Interface] section here.
        let peer_only = self.tunnel.render(ConfigFormat::Wg);
        if format == ConfigFormat::Wg {
            return peer_only;
        }
        let (interface, peer) = peer_only
            .split_once("\n[Peer]\n")
            .expect("TunnelConfig renders a [Peer] section");
        let mut text = interface.to_string();
        let _ = writeln!(text, "Address = {}", self.tunnel.address);
        if let Some(mtu) = self.tunnel.mtu {
            let _ = writeln!(text, "MTU = {mtu}");
        }
        let routed = format_allowed_ips(&self.tunnel.allowed_ips);
        match &self.dns {
            Dns::Everything => {
                let _ = writeln!(
                    text,
                    "# A full tunnel: all traffic ({routed}) and every DNS query go into the cluster."
                );
                let _ = writeln!(text, "DNS = {SERVER_ADDRESS}");
            }
            Dns::ClusterDomain(domain) => text.push_str(&split_dns_lines(domain, &routed)),
        }
        text.push_str("\n[Peer]\n");
        text.push_str(peer);
        text
    }
}

/// The comment and `PostUp` of a split tunnel. wg-quick cuts a line at `#` and aborts (and
/// removes the interface) when a hook fails, so the hook holds no `#` and never fails.
fn split_dns_lines(domain: &str, routed: &str) -> String {
    format!(
        "# A split tunnel: only the cluster's ranges ({routed}) go through it.\n\
         # DNS: names under {domain} are asked of the cluster ({SERVER_ADDRESS}) through the tunnel;\n\
         # every other name keeps this machine's resolver. That needs systemd-resolved (resolvectl,\n\
         # most Linux desktops). Elsewhere PostUp only prints a notice and DNS is left alone:\n\
         # ask the cluster directly (dig @{SERVER_ADDRESS} web.demo.svc.{domain}); on macOS create\n\
         # /etc/resolver/{domain} holding \"nameserver {SERVER_ADDRESS}\". To send every DNS query into\n\
         # the cluster instead, replace PostUp with: DNS = {SERVER_ADDRESS}\n\
         PostUp = if command -v resolvectl >/dev/null && resolvectl dns %i {SERVER_ADDRESS} && resolvectl domain %i '~{domain}'; \
         then resolvectl default-route %i false 2>/dev/null || true; \
         else echo 'gefyra: cluster names are not set up (no systemd-resolved): resolve them at {SERVER_ADDRESS}, see the comments in this file' >&2; fi\n"
    )
}

/// `path` as a shell word that means that file when pasted: a bare name gets `./` (wg-quick
/// reads a bare name as an interface name), anything unusual is single-quoted.
pub fn shell_path(path: &Path) -> String {
    let text = path.to_string_lossy();
    let text = if path.is_absolute() || text.contains('/') {
        text.into_owned()
    } else {
        format!("./{text}")
    };
    let plain = text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-/+=,:@".contains(c));
    if plain {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// Why wg-quick would refuse `path`, if it would: the file must end in `.conf` and its
/// stem is the interface name (letters, digits, `_=+.-`, at most 15 characters).
pub fn wg_quick_problem(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_string_lossy();
    let Some(stem) = name.strip_suffix(".conf") else {
        return Some(format!(
            "wg-quick only reads files named INTERFACE.conf, not {name}: choose a --wg-config ending in .conf"
        ));
    };
    let valid = (1..=15).contains(&stem.len())
        && stem
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_=+.-".contains(c));
    (!valid).then(|| {
        format!(
            "wg-quick names the interface after the file, and {stem:?} is not an interface name (at most 15 letters, digits or _=+.-): choose a shorter --wg-config"
        )
    })
}

/// The interface name for a `wg` file: the default file's stem (at most 15 characters).
pub fn interface_name(path: &Path) -> String {
    path.file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .filter(|stem| wg_quick_problem(Path::new(&format!("{stem}.conf"))).is_none())
        .unwrap_or_else(|| "gefyra0".to_string())
}

/// The commands that bring the tunnel up, ready to paste.
pub fn bring_up(format: ConfigFormat, path: &Path, address: IpAddr, routes: &[IpNet]) -> String {
    let file = shell_path(path);
    match format {
        ConfigFormat::WgQuick => format!("sudo wg-quick up {file}"),
        ConfigFormat::Wg => {
            let interface = interface_name(path);
            let prefix = if address.is_ipv6() { 128 } else { 32 };
            let mut commands = vec![
                // `dev NAME` throughout: a file dev.conf names an interface `dev`.
                format!("sudo ip link add dev {interface} type wireguard"),
                format!("sudo wg setconf {interface} {file}"),
                format!("sudo ip address add {address}/{prefix} dev {interface}"),
                format!("sudo ip link set dev {interface} up"),
            ];
            commands.extend(
                routes
                    .iter()
                    .map(|net| format!("sudo ip route add {net} dev {interface}")),
            );
            commands.join(" && ")
        }
    }
}

/// The command that takes it down again.
pub fn take_down(format: ConfigFormat, path: &Path) -> String {
    match format {
        ConfigFormat::WgQuick => format!("sudo wg-quick down {}", shell_path(path)),
        ConfigFormat::Wg => format!("sudo ip link del dev {}", interface_name(path)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gefyra_api::connection::{WireGuardKey, parse_allowed_ips};
    use std::path::PathBuf;

    fn nets(text: &str) -> Vec<IpNet> {
        parse_allowed_ips(text).unwrap()
    }

    fn config(cluster_ranges: &str) -> ProviderConfig {
        ProviderConfig::new(
            "192.168.96.2".parse().unwrap(),
            WireGuardKey([1; 32]),
            None,
            WireGuardKey([2; 32]),
            WireGuardKey([3; 32]),
            "203.0.113.7:31820".parse().unwrap(),
            nets(cluster_ranges),
        )
    }

    fn local(allowed_ips: &str, dns: Dns) -> LocalTunnel {
        LocalTunnel {
            tunnel: TunnelConfig {
                private_key: WireGuardKey([1; 32]),
                address: "192.168.96.2/32".parse().unwrap(),
                mtu: Some(1380),
                server_public_key: WireGuardKey([2; 32]),
                preshared_key: Some(WireGuardKey([3; 32])),
                endpoint: "203.0.113.7:31820".parse().unwrap(),
                allowed_ips: nets(allowed_ips),
            },
            dns,
        }
    }

    #[test]
    fn the_cluster_ranges_are_routed_unless_asked_otherwise() {
        let published = config("192.168.96.0/20, 10.244.0.0/16, 10.96.0.0/12");
        assert_eq!(
            routes(&[], &published),
            Routes {
                nets: nets("192.168.96.0/20, 10.244.0.0/16, 10.96.0.0/12"),
                warning: None
            }
        );
        let full = routes(&nets("0.0.0.0/0, ::/0"), &published);
        assert_eq!(full.nets, nets("0.0.0.0/0, ::/0"));
        assert!(full.warning.is_none() && is_full_tunnel(&full.nets));
        assert!(!is_full_tunnel(&published.cluster_ranges));
        let without_dns = routes(&nets("10.96.0.0/12"), &published);
        assert!(without_dns.warning.unwrap().contains("192.168.99.1"));
        // An operator that publishes no ranges: DNS only, and the flag to fix it.
        let old = routes(&[], &config(""));
        assert_eq!(old.nets, nets("192.168.99.1/32"));
        assert!(old.warning.unwrap().contains("--allowed-ips"));
    }

    #[test]
    fn a_split_tunnel_routes_the_cluster_and_resolves_only_its_names() {
        let text = local(
            "192.168.96.0/20, 10.96.0.0/12",
            Dns::ClusterDomain("cluster.local".into()),
        )
        .render(ConfigFormat::WgQuick);
        assert!(
            text.starts_with(
                "[Interface]\nPrivateKey = AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\nAddress = 192.168.96.2/32\nMTU = 1380\n# A split tunnel"
            ),
            "{text}"
        );
        assert!(
            !text.contains("\nDNS ="),
            "no resolver for everything: {text}"
        );
        let post_up = text
            .lines()
            .find(|line| line.starts_with("PostUp = "))
            .expect("a PostUp line");
        assert_eq!(
            post_up,
            "PostUp = if command -v resolvectl >/dev/null && resolvectl dns %i 192.168.99.1 && resolvectl domain %i '~cluster.local'; \
             then resolvectl default-route %i false 2>/dev/null || true; \
             else echo 'gefyra: cluster names are not set up (no systemd-resolved): resolve them at 192.168.99.1, see the comments in this file' >&2; fi"
        );
        // wg-quick cuts lines at '#': the hook must hold none.
        assert!(!post_up.contains('#'));
        assert!(text.ends_with(
            "\n[Peer]\nPublicKey = AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=\nPresharedKey = AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=\nEndpoint = 203.0.113.7:31820\n\
             AllowedIPs = 192.168.96.0/20, 10.96.0.0/12\nPersistentKeepalive = 21\n"
        ), "{text}");
        // Every line is a comment, a section or KEY = VALUE.
        for line in text.lines().filter(|line| !line.is_empty()) {
            assert!(
                line.starts_with('#') || line.starts_with('[') || line.contains(" = "),
                "{line}"
            );
        }
    }

    #[test]
    fn a_full_tunnel_sends_everything_and_every_query_as_gefyra_does() {
        let text = local("0.0.0.0/0, ::/0", Dns::Everything).render(ConfigFormat::WgQuick);
        assert!(text.contains("\nDNS = 192.168.99.1\n"), "{text}");
        assert!(!text.contains("PostUp"), "{text}");
        assert!(text.contains("\nAllowedIPs = 0.0.0.0/0, ::/0\n"), "{text}");
    }

    #[test]
    fn wg_files_hold_no_wg_quick_lines() {
        let text = local("10.96.0.0/12", Dns::ClusterDomain("cluster.local".into()))
            .render(ConfigFormat::Wg);
        for key in ["Address", "DNS", "MTU", "PostUp", "#"] {
            assert!(!text.contains(key), "{key}: {text}");
        }
    }

    #[test]
    fn cluster_domains_are_dns_names() {
        assert_eq!(
            parse_cluster_domain("Cluster.Local.").unwrap(),
            "cluster.local"
        );
        for bad in ["", "a b", "x'; rm -rf /", "a\nb", "~x"] {
            assert!(parse_cluster_domain(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn printed_commands_work_when_pasted() {
        let default = PathBuf::from("gefyra-01234567.conf");
        let address: IpAddr = "192.168.96.2".parse().unwrap();
        assert_eq!(
            bring_up(ConfigFormat::WgQuick, &default, address, &[]),
            "sudo wg-quick up ./gefyra-01234567.conf"
        );
        assert_eq!(
            take_down(ConfigFormat::WgQuick, &default),
            "sudo wg-quick down ./gefyra-01234567.conf"
        );
        assert_eq!(
            bring_up(
                ConfigFormat::WgQuick,
                Path::new("/home/a b/dev.conf"),
                address,
                &[]
            ),
            "sudo wg-quick up '/home/a b/dev.conf'"
        );
        assert_eq!(shell_path(Path::new("it's.conf")), r"'./it'\''s.conf'");
        assert_eq!(
            bring_up(
                ConfigFormat::Wg,
                &default,
                address,
                &nets("192.168.96.0/20, 10.96.0.0/12")
            ),
            "sudo ip link add dev gefyra-01234567 type wireguard && sudo wg setconf gefyra-01234567 ./gefyra-01234567.conf && \
             sudo ip address add 192.168.96.2/32 dev gefyra-01234567 && sudo ip link set dev gefyra-01234567 up && \
             sudo ip route add 192.168.96.0/20 dev gefyra-01234567 && sudo ip route add 10.96.0.0/12 dev gefyra-01234567"
        );
        assert_eq!(
            take_down(ConfigFormat::Wg, Path::new("some/very-long-file-name.conf")),
            "sudo ip link del dev gefyra0"
        );
    }

    #[test]
    fn files_wg_quick_refuses_are_named() {
        assert_eq!(wg_quick_problem(Path::new("gefyra-01234567.conf")), None);
        assert_eq!(wg_quick_problem(Path::new("/tmp/dev.conf")), None);
        assert!(
            wg_quick_problem(Path::new("dev.wg"))
                .unwrap()
                .contains(".conf")
        );
        assert!(
            wg_quick_problem(Path::new("gefyra-0123456789.conf"))
                .unwrap()
                .contains("15")
        );
    }
}
