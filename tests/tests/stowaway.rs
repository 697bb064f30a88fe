//! Stowaway with real WireGuard peers (wireguard-go + wg in network namespaces), the real
//! control plane and the operator. Stowaway runs as an unprivileged user without
//! capabilities and with nothing but its own Role.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine;
use gefyra_api::{ClientState, GefyraClient};
use gefyra_e2e::lab::{Lab, PeerConfig, Stowaway, stowaway_identity};
use gefyra_e2e::{
    Cluster, Operator, WAIT, create_client, eventually, install_crd, wait_for_ready, wait_for_state,
};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};

const DNS_NAME: &str = "web.lab.test";

async fn connect(api: &Api<GefyraClient>, name: &str, parameter: Value) -> Result<GefyraClient> {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "providerParameter": parameter })),
    )
    .await
    .with_context(|| format!("connecting {name}"))?;
    if parameter.is_null() {
        wait_for_state(api, name, ClientState::Waiting).await
    } else {
        wait_for_state(api, name, ClientState::Active).await
    }
}

/// A fresh key pair, base64: (private, public).
fn key_pair() -> (String, String) {
    let secret = x25519_dalek::StaticSecret::from(rand::random::<[u8; 32]>());
    let public = x25519_dalek::PublicKey::from(&secret);
    let encode = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    (encode(secret.as_bytes()), encode(public.as_bytes()))
}

/// Everything one test needs: a lab with services, the operator, Stowaway.
struct Setup {
    lab: Lab,
    clients: Api<GefyraClient>,
    stowaway: Stowaway,
    _operator: Operator,
}

async fn setup(cluster: &Cluster, test: &str, forwards: &[String]) -> Result<Setup> {
    install_crd(cluster).await?;
    let ns = cluster.namespace(test).await?;
    let admin = cluster.admin()?;
    let mut lab = Lab::new()?;
    let cluster_address = lab.cluster_address();
    let cluster_netns = lab.cluster_netns();
    lab.serve(&cluster_netns, IpAddr::V4(cluster_address), "cluster")?;
    let resolver = lab.serve_dns(DNS_NAME, cluster_address)?;
    let operator = Operator::start(cluster, &ns, &[])?;
    let token = stowaway_identity(cluster, &ns).await?;
    let kubeconfig = lab.kubeconfig_for(cluster, &token)?;
    let mut extra = vec![
        "--resolver".to_string(),
        resolver.to_string(),
        "--status-interval".to_string(),
        "1".to_string(),
    ];
    for forward in forwards {
        extra.extend(["--forward".to_string(), forward.clone()]);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let stowaway = lab.stowaway(&kubeconfig, &ns, &extra)?;
    let clients = Api::namespaced(admin, &ns);
    Ok(Setup {
        lab,
        clients,
        stowaway,
        _operator: operator,
    })
}

impl Setup {
    /// A client, connected with `parameter` (plus `publicKey` when it keeps its own key),
    /// and its real peer.
    async fn connected_peer(
        &mut self,
        name: &str,
        parameter: Value,
        own_key: bool,
    ) -> Result<gefyra_e2e::lab::Peer> {
        let admin = self.clients.clone().into_client();
        let ns = self.clients.namespace().context("namespaced")?.to_string();
        create_client(admin, &ns, name).await?;
        wait_for_ready(&self.clients, name).await?;
        let mut parameter = parameter;
        let private = if own_key {
            let (private, public) = key_pair();
            parameter["publicKey"] = json!(public);
            Some(private)
        } else {
            None
        };
        let active = connect(&self.clients, name, parameter).await?;
        let config = PeerConfig::of(&active, private.as_deref())?;
        let peer = self.lab.peer(&config, self.stowaway.port)?;
        Ok(peer)
    }

    /// The peer reaches 192.168.99.1 (ping, DNS) and the cluster (HTTP, UDP).
    async fn reaches_the_cluster(&self, netns: &str) -> Result<()> {
        let lab = &self.lab;
        eventually(
            &format!("{netns} pings 192.168.99.1"),
            Duration::from_secs(30),
            || async {
                Ok(lab
                    .exec_in(netns, "ping", &["-c", "1", "-W", "1", "192.168.99.1"])
                    .ok())
            },
        )
        .await
        .with_context(|| self.stowaway.process.log_text())?;
        let resolved = lab.probe(netns, &["dns", "192.168.99.1:53", DNS_NAME])?;
        ensure!(
            resolved == lab.cluster_address().to_string(),
            "{netns} resolves {DNS_NAME} via 192.168.99.1: {resolved}"
        );
        let service = lab.cluster_address();
        let body = lab.probe(netns, &["http", &format!("http://{service}:8080/")])?;
        ensure!(
            body == "cluster",
            "HTTP from the cluster namespace: {body:?}"
        );
        let echoed = lab.probe(netns, &["udp", &format!("{service}:7007"), "hello"])?;
        ensure!(echoed == "hello", "UDP echo: {echoed:?}");
        Ok(())
    }
}

#[tokio::test]
async fn real_peers_reach_the_cluster_through_an_unprivileged_stowaway() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    // A's subnet holds the address both peers serve on; the forward must reach A only.
    // (Peer subnets exist only inside the peers' namespaces and this Stowaway.)
    let subnet_a = "172.31.200.0/24";
    let target = "172.31.200.1";
    let forward_port = gefyra_e2e::free_port();
    let mut setup = setup(
        &cluster,
        "stowaway",
        &[format!("{forward_port}={target}:8080")],
    )
    .await?;
    setup.stowaway.wait_ready().await?;
    ensure!(
        setup.stowaway.process.is_running(),
        "Stowaway runs as nobody"
    );

    // Two clients as real users connect: our flavour (own key + subnet) and Gefyra's
    // (subnet only; the operator generated the key pair).
    let a = setup
        .connected_peer("a", json!({ "subnet": subnet_a }), true)
        .await?;
    let b = setup
        .connected_peer("b", json!({ "subnet": "172.30.200.0/24" }), false)
        .await?;
    setup.reaches_the_cluster(&a.netns).await?;
    setup.reaches_the_cluster(&b.netns).await?;

    // status.wireguard is written back.
    let clients = setup.clients.clone();
    eventually("status.wireguard of a", WAIT, || async {
        let client = clients.get("a").await?;
        let wireguard = client
            .status
            .as_ref()
            .and_then(|status| status.wireguard.clone());
        Ok(wireguard.map(Value::Object).filter(|status| {
            status["latest_handshake"].is_string()
                && status["transfer"]["received"].as_u64().unwrap_or(0) > 0
                && status["endpoint"]["host"] == json!(a.address.to_string())
        }))
    })
    .await?;

    // From the cluster side to an address in A's subnet: reaches A, never B (B serves on
    // the same address in its own namespace).
    let target_ip: IpAddr = target.parse()?;
    ip_in(
        &a.netns,
        &["addr", "add", &format!("{target}/32"), "dev", "lo"],
    )?;
    ip_in(
        &b.netns,
        &["addr", "add", &format!("{target}/32"), "dev", "lo"],
    )?;
    setup.lab.serve(&a.netns, target_ip, "peer-a")?;
    setup.lab.serve(&b.netns, target_ip, "peer-b")?;
    let cluster_netns = setup.lab.cluster_netns();
    let forwarded = format!("http://{}:{forward_port}/", setup.lab.cluster_gateway());
    for _ in 0..3 {
        let body = setup.lab.probe(&cluster_netns, &["http", &forwarded])?;
        ensure!(body == "peer-a", "the forward reached {body:?}");
    }

    // A source outside A's ranges is dropped and counted.
    let spoofed = format!("10.250.{}.9", setup.lab.slot);
    ip_in(
        &a.netns,
        &["addr", "add", &format!("{spoofed}/32"), "dev", &a.interface],
    )?;
    let service = format!("{}:7007", setup.lab.cluster_address());
    let reply = setup
        .lab
        .probe(&a.netns, &["udp", &service, "spoof", "--from", &spoofed]);
    ensure!(reply.is_err(), "a spoofed datagram was answered: {reply:?}");
    let spoofs = setup
        .stowaway
        .metric("stowaway_dropped_total{reason=\"spoofed_source\"}")
        .await?;
    ensure!(spoofs >= 1.0, "spoofed_source drops: {spoofs}");

    // A transfer on A runs while C connects and B disconnects: it is not interrupted.
    let lab_binary = gefyra_e2e::lab::lab_binary();
    let slow = format!("http://{}:8080/slow/6", setup.lab.cluster_address());
    let download = std::process::Command::new("ip")
        .args(["netns", "exec", &a.netns])
        .arg(&lab_binary)
        .args(["download", &slow])
        .output();
    let download = tokio::task::spawn_blocking(move || download);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = setup
        .connected_peer("c", json!({ "subnet": "172.29.200.0/24" }), true)
        .await?;
    connect(&setup.clients, "b", Value::Null).await?;
    setup.reaches_the_cluster(&c.netns).await?;
    let lab = &setup.lab;
    eventually("b's tunnel is closed", WAIT, || async {
        Ok(lab
            .exec_in(&b.netns, "ping", &["-c", "1", "-W", "1", "192.168.99.1"])
            .is_err()
            .then_some(()))
    })
    .await?;
    let output = download.await??;
    ensure!(
        output.status.success(),
        "the transfer on a failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let received: usize = String::from_utf8_lossy(&output.stdout).trim().parse()?;
    ensure!(
        received == 60 * 16 * 1024,
        "the transfer delivered {received} bytes"
    );

    // A deleted client's peer can no longer handshake.
    setup.clients.delete("c", &DeleteParams::default()).await?;
    gefyra_e2e::wait_gone(&setup.clients, "c").await?;
    let stowaway = &setup.stowaway;
    eventually("c's peer is removed", WAIT, || async {
        Ok((stowaway.metric("stowaway_peers").await? == 1.0).then_some(()))
    })
    .await?;
    let unknown_before = stowaway
        .metric("stowaway_handshakes_total{result=\"unknown_peer\"}")
        .await?;
    // A fresh handshake from c: re-adding the peer in wg forgets its session.
    let config = setup
        .lab
        .exec_in(&c.netns, "wg", &["showconf", &c.interface])?;
    let config_file = setup.lab.dir.join("c.conf");
    gefyra_e2e::lab::write_secret(&config_file, &config)?;
    setup.lab.exec_in(
        &c.netns,
        "wg",
        &[
            "setconf",
            &c.interface,
            config_file.to_str().context("utf-8")?,
        ],
    )?;
    let pinged = setup
        .lab
        .exec_in(&c.netns, "ping", &["-c", "2", "-W", "1", "192.168.99.1"]);
    ensure!(
        pinged.is_err(),
        "a deleted client's peer still gets through"
    );
    eventually("c's handshake is refused", WAIT, || async {
        let refused = stowaway
            .metric("stowaway_handshakes_total{result=\"unknown_peer\"}")
            .await?;
        Ok((refused > unknown_before).then_some(()))
    })
    .await?;
    // A is still fine.
    setup.reaches_the_cluster(&a.netns).await?;
    ensure!(setup.stowaway.process.is_running(), "Stowaway still runs");
    Ok(())
}

/// `ip -n NETNS ARGS...`
fn ip_in(netns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    gefyra_e2e::lab::run("ip", &all)
}

/// WireGuard handshake initiations from `count` random keys that are nobody's peer, all
/// valid for the server's public key (so they pass the MAC check and cost the server work).
fn strangers_initiations(server_public: &str, count: usize) -> Result<Vec<Vec<u8>>> {
    use boringtun::noise::{Tunn, TunnResult};
    use boringtun::x25519::{PublicKey, StaticSecret};
    let server: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(server_public)?
        .try_into()
        .map_err(|_| anyhow::anyhow!("a public key is 32 bytes"))?;
    let mut initiations = Vec::with_capacity(count);
    let mut buffer = vec![0u8; 256];
    for index in 0..count {
        let mut stranger = Tunn::new(
            StaticSecret::from(rand::random::<[u8; 32]>()),
            PublicKey::from(server),
            None,
            None,
            index as u32,
            None,
        );
        if let TunnResult::WriteToNetwork(packet) =
            stranger.format_handshake_initiation(&mut buffer, false)
        {
            initiations.push(packet.to_vec());
        }
    }
    Ok(initiations)
}

#[tokio::test]
async fn garbage_and_a_handshake_flood_leave_real_peers_connected() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    let mut setup = setup(&cluster, "stowaway-flood", &[]).await?;
    setup.stowaway.wait_ready().await?;
    let a = setup
        .connected_peer("a", json!({ "subnet": "172.31.200.0/24" }), true)
        .await?;
    setup.reaches_the_cluster(&a.netns).await?;
    let server_public = PeerConfig::of(&setup.clients.get("a").await?, Some(""))?.server_public_key;
    let initiations = strangers_initiations(&server_public, 3_000)?;

    // 10,000 random datagrams (every message type byte, every size up to 300), then the
    // flood of initiations, sent for a few seconds from another thread while the real
    // peer starts a new handshake.
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], setup.stowaway.port));
    let flood = std::thread::spawn(move || -> std::io::Result<usize> {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let mut sent = 0;
        for _ in 0..10_000 {
            let length = rand::random_range(0..300usize);
            let mut datagram: Vec<u8> = (0..length).map(|_| rand::random()).collect();
            if let Some(first) = datagram.first_mut() {
                *first %= 6;
            }
            socket.send_to(&datagram, target)?;
            sent += 1;
        }
        let until = std::time::Instant::now() + Duration::from_secs(4);
        while std::time::Instant::now() < until {
            for initiation in initiations.iter().take(500) {
                socket.send_to(initiation, target)?;
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(sent)
    });
    let config = setup
        .lab
        .exec_in(&a.netns, "wg", &["showconf", &a.interface])?;
    let config_file = setup.lab.dir.join("a.conf");
    gefyra_e2e::lab::write_secret(&config_file, &config)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    setup.lab.exec_in(
        &a.netns,
        "wg",
        &[
            "setconf",
            &a.interface,
            config_file.to_str().context("utf-8")?,
        ],
    )?;
    let sent = tokio::task::spawn_blocking(move || flood.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
    ensure!(sent >= 10_000, "sent {sent}");
    setup.reaches_the_cluster(&a.netns).await?;
    ensure!(setup.stowaway.process.is_running(), "Stowaway survived");
    let stowaway = &setup.stowaway;
    let malformed = stowaway
        .metric("stowaway_dropped_total{reason=\"malformed\"}")
        .await?;
    let cookies = stowaway
        .metric("stowaway_handshakes_total{result=\"cookie_required\"}")
        .await?;
    let strangers = stowaway
        .metric("stowaway_handshakes_total{result=\"unknown_peer\"}")
        .await?;
    let completed = stowaway
        .metric("stowaway_handshakes_total{result=\"completed\"}")
        .await?;
    ensure!(malformed > 1_000.0, "malformed drops: {malformed}");
    ensure!(
        cookies > 0.0,
        "the flood was answered with cookie replies: {cookies}"
    );
    ensure!(
        strangers > 0.0,
        "strangers' handshakes refused: {strangers}"
    );
    ensure!(completed >= 2.0, "a's handshakes completed: {completed}");
    Ok(())
}
