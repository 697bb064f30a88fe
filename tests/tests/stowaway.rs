//! Stowaway with real WireGuard peers (wireguard-go + wg in network namespaces), the real
//! control plane and the operator. Stowaway runs as an unprivileged user without
//! capabilities and with nothing but its own Role.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine;
use gefyra_e2e::lab::{Deployment, PeerConfig, connect, key_pair, key_pair_of_worker};
use gefyra_e2e::{Cluster, WAIT, eventually};
use kube::api::DeleteParams;
use serde_json::{Value, json};

async fn setup(cluster: &Cluster, test: &str, forwards: &[String]) -> Result<Deployment> {
    let mut extra = vec!["--status-interval".to_string(), "1".to_string()];
    for forward in forwards {
        extra.extend(["--forward".to_string(), forward.clone()]);
    }
    Deployment::start(cluster, test, &extra).await
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
    // Unprivileged: nobody's uid, no effective or permitted capability.
    let status = std::fs::read_to_string(format!(
        "/proc/{}/status",
        setup.stowaway.process.child.id()
    ))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    ensure!(
        field("Uid:") == ["65534"; 4],
        "Stowaway's uids: {:?}",
        field("Uid:")
    );
    for capabilities in ["CapEff:", "CapPrm:"] {
        ensure!(
            field(capabilities) == ["0000000000000000"],
            "Stowaway's {capabilities} {:?}",
            field(capabilities)
        );
    }

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
        .metric("gefyra_stowaway_dropped_packets_total{reason=\"spoofed_source\"}")
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
        Ok((stowaway.metric("gefyra_stowaway_peers").await? == 1.0).then_some(()))
    })
    .await?;
    let unknown_before = stowaway
        .metric("gefyra_stowaway_handshakes_total{result=\"unknown_peer\"}")
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
            .metric("gefyra_stowaway_handshakes_total{result=\"unknown_peer\"}")
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
/// Peers shared out among three data-plane workers, one on each: all reach the cluster; a
/// forward accepted by the first worker reaches a peer of the last; and when every peer
/// roams to a new source port, each keeps its session and its data still reaches its own
/// worker without a handoff (the kernel steers datagrams by the receiver index they name).
#[tokio::test]
async fn peers_on_every_worker_reach_the_cluster_and_keep_their_session_when_they_roam()
-> Result<()> {
    let cluster = Cluster::from_env().await?;
    let workers = 3;
    let forward_port = gefyra_e2e::free_port();
    let target = "172.31.212.1";
    let mut setup = Deployment::start(
        &cluster,
        "stowaway-workers",
        &[
            "--status-interval".to_string(),
            "1".to_string(),
            "--workers".to_string(),
            workers.to_string(),
            "--forward".to_string(),
            format!("{forward_port}={target}:8080"),
        ],
    )
    .await?;
    setup.stowaway.wait_ready().await?;
    ensure!(setup.stowaway.metric("gefyra_stowaway_workers").await? == 3.0);
    let mut peers = Vec::new();
    for worker in 0..workers {
        let name = format!("w{worker}");
        let subnet = format!("172.31.{}.0/24", 210 + worker);
        let peer = setup
            .connected_peer_with_key(
                &name,
                json!({ "subnet": subnet }),
                Some(key_pair_of_worker(worker, workers)?),
            )
            .await?;
        setup.reaches_the_cluster(&peer.netns).await?;
        peers.push(peer);
    }

    // The forward's listener is the first worker's; its target is the last worker's peer.
    let last = &peers[2];
    ip_in(
        &last.netns,
        &["addr", "add", &format!("{target}/32"), "dev", "lo"],
    )?;
    setup.lab.serve(&last.netns, target.parse()?, "peer-w2")?;
    let forwarded = format!("http://{}:{forward_port}/", setup.lab.cluster_gateway());
    let body = setup
        .lab
        .probe(&setup.lab.cluster_netns(), &["http", &forwarded])?;
    ensure!(body == "peer-w2", "the forward reached {body:?}");
    let forwards = setup
        .stowaway
        .metric(r#"gefyra_stowaway_handoffs_total{kind="forward"}"#)
        .await?;
    ensure!(forwards == 1.0, "forwards handed over: {forwards}");

    // Every peer roams: a new source port, the same session, its worker found by the kernel.
    let completed = r#"gefyra_stowaway_handshakes_total{result="completed"}"#;
    let datagrams = r#"gefyra_stowaway_handoffs_total{kind="datagram"}"#;
    let handshakes_before = setup.stowaway.metric(completed).await?;
    let handoffs_before = setup.stowaway.metric(datagrams).await?;
    for (index, peer) in peers.iter().enumerate() {
        let port = (41_000 + index).to_string();
        setup.lab.exec_in(
            &peer.netns,
            "wg",
            &["set", &peer.interface, "listen-port", &port],
        )?;
    }
    for peer in &peers {
        setup.reaches_the_cluster(&peer.netns).await?;
    }
    let clients = setup.clients.clone();
    for (index, peer) in peers.iter().enumerate() {
        let name = format!("w{index}");
        let port = 41_000 + index as u64;
        eventually(
            &format!("{name}'s new endpoint in its status"),
            WAIT,
            || async {
                let client = clients.get(&name).await?;
                let endpoint = client
                    .status
                    .and_then(|status| status.wireguard)
                    .and_then(|wireguard| wireguard.get("endpoint").cloned());
                Ok(endpoint.filter(|endpoint| {
                    endpoint["host"] == json!(peer.address.to_string())
                        && endpoint["port"].as_u64() == Some(port)
                }))
            },
        )
        .await?;
    }
    let handshakes = setup.stowaway.metric(completed).await? - handshakes_before;
    let handoffs = setup.stowaway.metric(datagrams).await? - handoffs_before;
    ensure!(
        handshakes == 0.0,
        "roaming took {handshakes} new handshakes"
    );
    ensure!(
        handoffs == 0.0,
        "{handoffs} datagrams reached the wrong worker after roaming"
    );
    for reason in ["misrouted", "handoff_queue_full"] {
        let dropped = setup
            .stowaway
            .metric(&format!(
                r#"gefyra_stowaway_dropped_packets_total{{reason="{reason}"}}"#
            ))
            .await?;
        ensure!(dropped == 0.0, "{dropped} dropped as {reason}");
    }
    Ok(())
}

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
    let server_public = PeerConfig::of(&setup.clients.get("a").await?, Some(&key_pair().0))?
        .server_public_key
        .to_string();
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
        .metric("gefyra_stowaway_dropped_packets_total{reason=\"malformed\"}")
        .await?;
    let cookies = stowaway
        .metric("gefyra_stowaway_handshakes_total{result=\"cookie_required\"}")
        .await?;
    let strangers = stowaway
        .metric("gefyra_stowaway_handshakes_total{result=\"unknown_peer\"}")
        .await?;
    let completed = stowaway
        .metric("gefyra_stowaway_handshakes_total{result=\"completed\"}")
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
    // Stowaway killed and started again: it rebuilds its peers from the API, and the peer
    // reconnects with the config it already has.
    setup.restart_stowaway().await?;
    setup.reaches_the_cluster(&a.netns).await?;
    Ok(())
}

#[tokio::test]
async fn bulk_transfers_complete_in_both_directions_and_in_parallel() -> Result<()> {
    const BYTES: usize = 32 << 20;
    let cluster = Cluster::from_env().await?;
    let mut setup = setup(&cluster, "stowaway-bulk", &[]).await?;
    setup.stowaway.wait_ready().await?;
    let a = setup
        .connected_peer("a", json!({ "subnet": "172.31.200.0/24" }), true)
        .await?;
    setup.reaches_the_cluster(&a.netns).await?;
    let url = |path: &str| format!("http://{}:8080{path}", setup.lab.cluster_address());
    // Sequentially, then four at once each way (flows share the tunnel and the stack).
    for round in [1usize, 4] {
        let mut transfers = Vec::new();
        for _ in 0..round {
            for (kind, target) in [
                ("download", url(&format!("/bytes/{BYTES}"))),
                ("upload", url("/")),
            ] {
                let mut command = std::process::Command::new("ip");
                command
                    .args(["netns", "exec", &a.netns])
                    .arg(gefyra_e2e::lab::lab_binary())
                    .args([kind, &target]);
                if kind == "upload" {
                    command.arg(BYTES.to_string());
                }
                transfers.push((kind, tokio::task::spawn_blocking(move || command.output())));
            }
        }
        for (kind, transfer) in transfers {
            let output = transfer.await??;
            ensure!(
                output.status.success(),
                "{kind} failed: {}\nStowaway log:\n{}",
                String::from_utf8_lossy(&output.stderr),
                setup.stowaway.process.log_text()
            );
            let count: usize = String::from_utf8_lossy(&output.stdout).trim().parse()?;
            ensure!(count == BYTES, "{kind} moved {count} of {BYTES} bytes");
        }
    }
    // The cluster side closes while the peer still sends: the peer's connection is reset,
    // and Stowaway goes on serving (this once spun the data plane forever).
    let early = setup.lab.probe(
        &a.netns,
        &["upload", &url("/close-early"), &BYTES.to_string()],
    );
    ensure!(
        early.is_err(),
        "an upload to a closed service succeeded: {early:?}"
    );
    setup.reaches_the_cluster(&a.netns).await?;
    ensure!(setup.stowaway.process.is_running(), "Stowaway still runs");
    Ok(())
}

/// The attacks of a client holding nothing but its own client file, and of a forged
/// `providerConfig` (which only an admin can write now), against real peers: Stowaway takes
/// a peer's address only from its claim and its subnet only from the routes table, so
/// neither diverts another client's traffic.
#[tokio::test]
async fn forged_configs_and_subnets_never_divert_another_clients_traffic() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    let subnet_a = "172.31.210.0/24";
    let target = "172.31.210.1";
    let forward_port = gefyra_e2e::free_port();
    let mut setup = setup(
        &cluster,
        "stowaway-forged",
        &[format!("{forward_port}={target}:8080")],
    )
    .await?;
    setup.stowaway.wait_ready().await?;
    let a = setup
        .connected_peer("a", json!({ "subnet": subnet_a }), true)
        .await?;
    let b = setup
        .connected_peer("b", json!({ "subnet": "172.30.210.0/24" }), true)
        .await?;
    setup.reaches_the_cluster(&a.netns).await?;
    setup.reaches_the_cluster(&b.netns).await?;
    // Both peers serve on the target address; the forward must reach A, whatever B does.
    let target_ip: IpAddr = target.parse()?;
    for (peer, name) in [(&a, "peer-a"), (&b, "peer-b")] {
        ip_in(
            &peer.netns,
            &["addr", "add", &format!("{target}/32"), "dev", "lo"],
        )?;
        setup.lab.serve(&peer.netns, target_ip, name)?;
    }
    let cluster_netns = setup.lab.cluster_netns();
    let forwarded = format!("http://{}:{forward_port}/", setup.lab.cluster_gateway());
    let forward_reaches_a = |setup: &gefyra_e2e::lab::Deployment| -> Result<()> {
        for _ in 0..3 {
            let body = setup.lab.probe(&cluster_netns, &["http", &forwarded])?;
            ensure!(body == "peer-a", "the forward reached {body:?}");
        }
        Ok(())
    };
    forward_reaches_a(&setup)?;

    // B, with its own token, asks for A's subnet while ACTIVE: refused (ERROR
    // SubnetConflict); A's traffic stays A's.
    let b_client = setup.clients.get("b").await?;
    let b_token = gefyra_e2e::token_of(&b_client)?;
    let as_b: kube::Api<gefyra_api::GefyraClient> = kube::Api::namespaced(
        cluster.with_token(&b_token)?,
        setup.clients.namespace().context("namespaced")?,
    );
    let b_parameter = b_client
        .provider_parameter
        .clone()
        .context("b is connected")?;
    let mut hostile = b_parameter.clone();
    hostile.insert("subnet".into(), json!(subnet_a));
    gefyra_e2e::set_provider_parameter(&as_b, "b", Value::Object(hostile.clone())).await?;
    let clients = setup.clients.clone();
    eventually("b is refused A's subnet", WAIT, || async {
        let b = clients.get("b").await?;
        let reason = b.ready_condition().map(|ready| ready.reason.clone());
        Ok((b.state == gefyra_api::ClientState::Error
            && reason.as_deref() == Some("SubnetConflict"))
        .then_some(()))
    })
    .await?;
    forward_reaches_a(&setup)?;
    setup.reaches_the_cluster(&a.netns).await?;

    // With the operator stopped (so nothing corrects it), an admin forges B's
    // providerConfig with A's tunnel address: B is no peer, counted, and A is untouched.
    setup.operator.kill().await?;
    let a_address = PeerConfig::of(&setup.clients.get("a").await?, Some(&key_pair().0))?.address;
    let mut forged = b_client
        .provider_config
        .clone()
        .context("b has a providerConfig")?;
    forged.insert("Interface.Address".into(), json!(a_address.to_string()));
    setup
        .clients
        .patch(
            "b",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"state": "ACTIVE", "providerConfig": forged})),
        )
        .await?;
    let stowaway = &setup.stowaway;
    eventually("b's forged config is refused", WAIT, || async {
        let refused = stowaway
            .metric("gefyra_stowaway_refused_clients{reason=\"address_not_claimed\"}")
            .await?;
        Ok((refused == 1.0).then_some(()))
    })
    .await?;
    ensure!(
        stowaway.metric("gefyra_stowaway_peers").await? == 1.0,
        "only a is a peer"
    );
    setup.reaches_the_cluster(&a.netns).await?;
    forward_reaches_a(&setup)?;

    // B's own config back, ACTIVE, still asking for A's subnet: B is a peer again, with
    // only the subnet the routes table records for it; the forward still reaches A.
    setup
        .clients
        .patch(
            "b",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"state": "ACTIVE", "providerConfig": b_client.provider_config}),
            ),
        )
        .await?;
    eventually("b is a peer again", WAIT, || async {
        Ok((stowaway.metric("gefyra_stowaway_peers").await? == 2.0).then_some(()))
    })
    .await?;
    setup.reaches_the_cluster(&b.netns).await?;
    forward_reaches_a(&setup)?;
    ensure!(setup.stowaway.process.is_running(), "Stowaway still runs");
    Ok(())
}

/// The attack, with the attacker's own credentials: a client connected with its own key
/// drives a userspace WireGuard peer that writes any packet it likes. Stowaway refuses its
/// way to loopback, link-local, Stowaway's own addresses and anything outside `--allow`
/// (a reset, an ICMP error, counted), refuses its flows beyond its limits while a real
/// neighbour peer keeps working, and expires what it leaves half-open or abandons — while
/// the neighbour's idle connection, kept alive by its kernel, survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peer_reaches_only_what_the_policy_allows_and_holds_only_its_share() -> Result<()>
{
    use gefyra_e2e::attacker::{Attacker, Reply, Segment, port, syn_answered};
    use smoltcp::wire::TcpControl;
    use std::net::SocketAddrV4;

    let cluster = Cluster::from_env().await?;
    let extra: Vec<String> = [
        "--status-interval",
        "1",
        // The lab's cluster namespace lives in 10.77.0.0/16.
        "--allow",
        "10.0.0.0/8",
        "--peer-max-tcp-flows",
        "3",
        "--peer-max-dials",
        "3",
        "--peer-max-udp-flows",
        "2",
        "--tcp-idle-timeout",
        "3",
        "--tcp-handshake-timeout",
        "2",
        "--udp-idle-timeout",
        "2",
    ]
    .map(str::to_string)
    .to_vec();
    let mut setup = Deployment::start(&cluster, "hostile", &extra).await?;
    setup.stowaway.wait_ready().await?;
    let neighbour = setup
        .connected_peer("neighbour", json!({ "subnet": "172.28.200.0/24" }), true)
        .await?;
    setup.reaches_the_cluster(&neighbour.netns).await?;

    // The attacker: a client of its own, its own key, a tunnel of its own making.
    let admin = setup.clients.clone().into_client();
    let ns = setup.clients.namespace().context("namespaced")?.to_string();
    gefyra_e2e::create_client(admin, &ns, "mallory").await?;
    gefyra_e2e::wait_for_ready(&setup.clients, "mallory").await?;
    let (private, public) = key_pair();
    let active = connect(&setup.clients, "mallory", json!({ "publicKey": public })).await?;
    let config = PeerConfig::of(&active, Some(&private))?;
    let stowaway_address = format!("127.0.0.1:{}", setup.stowaway.port).parse()?;
    let mut mallory = tokio::task::block_in_place(|| Attacker::connect(&config, stowaway_address))?;
    let stowaway = &setup.stowaway;
    let cluster_address = setup.lab.cluster_address();
    let http = SocketAddrV4::new(cluster_address, 8080);
    let echo = SocketAddrV4::new(cluster_address, 7007);
    let metrics_port = stowaway.http_port;

    // Egress: Stowaway's own metrics (on loopback, and the port on an address of its own
    // network namespace), the metadata service, and an address outside --allow: each a
    // reset.
    let denied_before = stowaway
        .metric("gefyra_stowaway_dropped_packets_total{reason=\"egress_denied\"}")
        .await?;
    let refused_destinations = [
        SocketAddrV4::new([127, 0, 0, 1].into(), metrics_port),
        SocketAddrV4::new(setup.lab.cluster_gateway(), metrics_port),
        SocketAddrV4::new([169, 254, 169, 254].into(), 80),
        SocketAddrV4::new([198, 51, 100, 1].into(), 80),
    ];
    for (index, destination) in refused_destinations.iter().enumerate() {
        let answered = tokio::task::block_in_place(|| {
            syn_answered(&mut mallory, port(index as u16), *destination)
        })?;
        ensure!(!answered, "the attacker reached {destination}");
    }
    // A datagram to the metadata service: an ICMP "administratively prohibited".
    let probe = mallory.udp(
        port(10),
        SocketAddrV4::new([169, 254, 169, 254].into(), 53),
        b"x",
    );
    mallory.send(&probe)?;
    let replies = tokio::task::block_in_place(|| mallory.receive(Duration::from_secs(2)))?;
    ensure!(
        replies.contains(&Reply::Unreachable { code: 13 }),
        "a refused datagram is answered with ICMP code 13: {replies:?}"
    );
    let denied = stowaway
        .metric("gefyra_stowaway_dropped_packets_total{reason=\"egress_denied\"}")
        .await?;
    ensure!(
        denied >= denied_before + 5.0,
        "egress refusals counted: {denied_before} -> {denied}"
    );
    // The cluster itself is reachable for the attacker too (the control).
    ensure!(
        tokio::task::block_in_place(|| syn_answered(&mut mallory, port(11), http))?,
        "the attacker's SYN to the cluster service is answered"
    );
    let reset = mallory.tcp(port(11), http, TcpControl::Rst, 1_001, None);
    mallory.send(&reset)?;

    // Limits: UDP flows beyond 2 are refused with an ICMP error, TCP flows beyond 3 with a
    // reset; the neighbour is untouched.
    eventually("the attacker's earlier flows are gone", WAIT, || async {
        let tcp = stowaway
            .metric("gefyra_stowaway_open_flows{protocol=\"tcp\"}")
            .await?;
        let udp = stowaway
            .metric("gefyra_stowaway_open_flows{protocol=\"udp\"}")
            .await?;
        Ok((tcp == 0.0 && udp == 0.0).then_some(()))
    })
    .await?;
    let limited_before = stowaway
        .metric("gefyra_stowaway_dropped_packets_total{reason=\"peer_limit\"}")
        .await?;
    for index in 20..23 {
        let datagram = mallory.udp(port(index), echo, b"echo");
        mallory.send(&datagram)?;
    }
    let replies = tokio::task::block_in_place(|| mallory.receive(Duration::from_secs(2)))?;
    let echoed = replies
        .iter()
        .filter(|reply| matches!(reply, Reply::Udp { payload, .. } if payload == b"echo"))
        .count();
    ensure!(
        echoed == 2 && replies.contains(&Reply::Unreachable { code: 13 }),
        "two UDP flows relayed, the third refused: {replies:?}"
    );
    let echoed = setup
        .lab
        .probe(&neighbour.netns, &["udp", &echo.to_string(), "neighbour"])?;
    ensure!(echoed == "neighbour", "the neighbour's UDP: {echoed:?}");
    for index in 30..34 {
        let syn = mallory.tcp(port(index), http, TcpControl::Syn, 1_000, None);
        mallory.send(&syn)?;
    }
    let replies = tokio::task::block_in_place(|| mallory.receive(Duration::from_secs(3)))?;
    // By port: a SYN-ACK (retransmitted, then reset when the handshake times out), or a
    // reset only.
    let ports_with = |want_syn: bool| {
        let mut ports: Vec<u16> = replies
            .iter()
            .filter_map(|reply| match reply {
                Reply::Tcp { syn, to_port, .. } if *syn == want_syn => Some(*to_port),
                _ => None,
            })
            .filter(|to_port| (30..34).map(port).any(|p| p == *to_port))
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    };
    let accepted = ports_with(true);
    let reset_only: Vec<u16> = ports_with(false)
        .into_iter()
        .filter(|p| !accepted.contains(p))
        .collect();
    ensure!(
        accepted.len() == 3 && reset_only.len() == 1,
        "three connections accepted and one reset: {replies:?}"
    );
    ensure!(
        stowaway
            .metric("gefyra_stowaway_dropped_packets_total{reason=\"peer_limit\"}")
            .await?
            >= limited_before + 2.0,
        "limit refusals counted"
    );
    let body = setup
        .lab
        .probe(&neighbour.netns, &["http", &format!("http://{http}/")])?;
    ensure!(
        body == "cluster",
        "the neighbour's HTTP while the attacker is at its limit: {body:?}"
    );

    // Timeouts: the three handshakes the attacker never completes expire, its UDP flows
    // idle out; then a connection it completes and abandons expires too.
    eventually("the half-open and idle flows expire", WAIT, || async {
        let handshakes = stowaway
            .metric("gefyra_stowaway_flow_expiries_total{protocol=\"tcp\",timeout=\"handshake\"}")
            .await?;
        let udp = stowaway
            .metric("gefyra_stowaway_flow_expiries_total{protocol=\"udp\",timeout=\"idle\"}")
            .await?;
        let open = stowaway
            .metric("gefyra_stowaway_open_flows{protocol=\"tcp\"}")
            .await?;
        Ok((handshakes >= 3.0 && udp >= 2.0 && open == 0.0).then_some(()))
    })
    .await?;
    // This connection also offers selective acknowledgements, with sequence numbers about
    // to wrap past 2^32, and sends data out of order: the acknowledgement that answers it
    // carries a SACK block (smoltcp before 0.14 overflowed computing it there — a panic that
    // stopped the data plane, found by the bulk-transfer test when a real peer's segment
    // was lost).
    let isn: u32 = 0xFFFF_FF00;
    let syn = mallory.tcp_segment(
        port(40),
        http,
        &Segment {
            control: TcpControl::Syn,
            seq: isn,
            ack: None,
            sack_permitted: true,
            payload: &[],
        },
    );
    mallory.send(&syn)?;
    let replies = tokio::task::block_in_place(|| mallory.receive(Duration::from_secs(2)))?;
    let server_seq = replies
        .iter()
        .find_map(|reply| match reply {
            Reply::Tcp {
                syn: true,
                seq,
                to_port,
                ..
            } if *to_port == port(40) => Some(*seq),
            _ => None,
        })
        .context("a SYN-ACK for the connection the attacker completes")?;
    let acknowledged = Some(server_seq.wrapping_add(1));
    let ack = mallory.tcp(
        port(40),
        http,
        TcpControl::None,
        isn.wrapping_add(1),
        acknowledged,
    );
    mallory.send(&ack)?;
    // Ten bytes, a thousand bytes past what Stowaway expects next: a hole before them.
    let out_of_order = mallory.tcp_segment(
        port(40),
        http,
        &Segment {
            control: TcpControl::Psh,
            seq: isn.wrapping_add(1_001),
            ack: acknowledged,
            sack_permitted: false,
            payload: b"0123456789",
        },
    );
    mallory.send(&out_of_order)?;
    let replies = tokio::task::block_in_place(|| mallory.receive(Duration::from_secs(2)))?;
    ensure!(
        replies.iter().any(|reply| matches!(
            reply,
            Reply::Tcp { to_port, ack: true, ack_number, .. }
                if *to_port == port(40) && *ack_number == isn.wrapping_add(1)
        )),
        "the out-of-order segment is answered with a duplicate acknowledgement: {replies:?}"
    );
    eventually("the abandoned connection expires", WAIT, || async {
        let idle = stowaway
            .metric("gefyra_stowaway_flow_expiries_total{protocol=\"tcp\",timeout=\"idle\"}")
            .await?;
        let open = stowaway
            .metric("gefyra_stowaway_open_flows{protocol=\"tcp\"}")
            .await?;
        Ok((idle >= 1.0 && open == 0.0).then_some(()))
    })
    .await?;

    // The neighbour's connection, idle for more than twice the idle timeout, survives: its
    // kernel answers the keep-alives.
    let held = setup
        .lab
        .probe(&neighbour.netns, &["hold", &format!("http://{http}/"), "7"])?;
    ensure!(
        held == "cluster",
        "an idle live connection survived: {held:?}"
    );
    setup.reaches_the_cluster(&neighbour.netns).await?;
    ensure!(setup.stowaway.process.is_running(), "Stowaway still runs");
    Ok(())
}

/// Stowaway's own Services lead back to it (kube-proxy hairpins their addresses to its
/// pod, and /metrics names every client): a real peer never reaches them. The lab has no
/// kube-proxy, so the metrics Service made here also names the lab's cluster service as an
/// external IP: that address answers the peer until Stowaway reads the Service, and is
/// refused after, as is its ClusterIP.
#[tokio::test]
async fn a_peer_never_reaches_stowaways_own_services() -> Result<()> {
    use k8s_openapi::api::core::v1::Service;
    use kube::Api;
    use kube::api::PostParams;

    let cluster = Cluster::from_env().await?;
    let mut setup = setup(&cluster, "own-services", &[]).await?;
    setup.stowaway.wait_ready().await?;
    let peer = setup
        .connected_peer("a", json!({ "subnet": "172.27.200.0/24" }), true)
        .await?;
    setup.reaches_the_cluster(&peer.netns).await?;
    let cluster_address = setup.lab.cluster_address();
    let service_url = format!("http://{cluster_address}:8080/");
    ensure!(
        setup.lab.probe(&peer.netns, &["http", &service_url])? == "cluster",
        "the control: the cluster service answers the peer"
    );

    let ns = setup.clients.namespace().context("namespaced")?.to_string();
    let services: Api<Service> = Api::namespaced(setup.clients.clone().into_client(), &ns);
    let service: Service = serde_json::from_value(json!({
        "metadata": { "name": "gefyra-stowaway-metrics" },
        "spec": {
            "type": "ClusterIP",
            "selector": { "app.kubernetes.io/name": "gefyra-stowaway" },
            "ports": [{ "name": "http-metrics", "port": 8081, "targetPort": 8081 }],
            "externalIPs": [cluster_address.to_string()],
        },
    }))?;
    let created = services.create(&PostParams::default(), &service).await?;
    let cluster_ip = created
        .spec
        .and_then(|spec| spec.cluster_ip)
        .context("the metrics Service's ClusterIP")?;
    // The peer routes the ClusterIP into the tunnel, as a client routing the service
    // range does.
    gefyra_e2e::lab::run(
        "ip",
        &[
            "-n",
            &peer.netns,
            "route",
            "add",
            &format!("{cluster_ip}/32"),
            "dev",
            &peer.interface,
        ],
    )?;
    let stowaway = &setup.stowaway;
    let lab = &setup.lab;
    let denied_before = stowaway
        .metric("gefyra_stowaway_dropped_packets_total{reason=\"egress_denied\"}")
        .await?;
    eventually(
        "the metrics Service's addresses are refused",
        WAIT,
        || async {
            Ok(lab
                .probe(&peer.netns, &["http", &service_url])
                .is_err()
                .then_some(()))
        },
    )
    .await
    .with_context(|| stowaway.process.log_text())?;
    let metrics_url = format!("http://{cluster_ip}:8081/metrics");
    ensure!(
        lab.probe(&peer.netns, &["http", &metrics_url]).is_err(),
        "the peer reached {metrics_url}"
    );
    let denied = stowaway
        .metric("gefyra_stowaway_dropped_packets_total{reason=\"egress_denied\"}")
        .await?;
    ensure!(
        denied >= denied_before + 2.0,
        "refusals by the egress policy counted: {denied_before} -> {denied}"
    );
    // The rest of the tunnel still works (the resolver, through the server address).
    let resolved = lab.probe(
        &peer.netns,
        &["dns", "192.168.99.1:53", gefyra_e2e::lab::DNS_NAME],
    )?;
    ensure!(
        resolved == cluster_address.to_string(),
        "the peer resolves through the tunnel: {resolved}"
    );
    ensure!(setup.stowaway.process.is_running(), "Stowaway still runs");
    Ok(())
}

/// Three greedy peers each hold only their share of the flows all peers share, and a
/// fourth still connects. Room for twelve TCP flows in all (1 MiB + 64 KiB of buffers
/// each) among four live peers: three each, though each peer's own limits would allow all
/// twelve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_peers_hold_only_their_share_and_another_still_connects() -> Result<()> {
    use gefyra_e2e::attacker::{Attacker, port, syn_answered};
    use std::net::SocketAddrV4;

    const FLOW_BUFFERS: u64 = (1 << 20) + (64 << 10);
    let cluster = Cluster::from_env().await?;
    let extra: Vec<String> = [
        "--status-interval",
        "1",
        "--max-buffer-bytes",
        &(12 * FLOW_BUFFERS).to_string(),
        "--peer-min-share-flows",
        "1",
        // The greedy peers never complete their connections: they hold them this long.
        "--tcp-handshake-timeout",
        "120",
    ]
    .map(str::to_string)
    .to_vec();
    let mut setup = Deployment::start(&cluster, "greedy", &extra).await?;
    setup.stowaway.wait_ready().await?;
    let neighbour = setup
        .connected_peer("neighbour", json!({ "subnet": "172.26.200.0/24" }), true)
        .await?;
    setup.reaches_the_cluster(&neighbour.netns).await?;

    let admin = setup.clients.clone().into_client();
    let ns = setup.clients.namespace().context("namespaced")?.to_string();
    let stowaway_address = format!("127.0.0.1:{}", setup.stowaway.port).parse()?;
    let mut greedy = Vec::new();
    for name in ["greedy-a", "greedy-b", "greedy-c"] {
        gefyra_e2e::create_client(admin.clone(), &ns, name).await?;
        gefyra_e2e::wait_for_ready(&setup.clients, name).await?;
        let (private, public) = key_pair();
        let active = connect(&setup.clients, name, json!({ "publicKey": public })).await?;
        let config = PeerConfig::of(&active, Some(&private))?;
        let attacker =
            tokio::task::block_in_place(|| Attacker::connect(&config, stowaway_address))?;
        greedy.push((name, attacker));
    }
    // The bounds are shared among the peers with a recent handshake: all four, once
    // Stowaway has counted them (every second).
    let stowaway = &setup.stowaway;
    eventually("four live peers", WAIT, || async {
        Ok((stowaway.metric("gefyra_stowaway_live_peers").await? == 4.0).then_some(()))
    })
    .await?;
    let http = SocketAddrV4::new(setup.lab.cluster_address(), 8080);
    for (name, attacker) in &mut greedy {
        let mut accepted = 0;
        for index in 0..5 {
            if tokio::task::block_in_place(|| syn_answered(attacker, port(index), http))? {
                accepted += 1;
            }
        }
        ensure!(
            accepted == 3,
            "{name}: {accepted} of 5 connections accepted, its share is 3"
        );
    }
    let shares = setup
        .stowaway
        .metric("gefyra_stowaway_dropped_packets_total{reason=\"peer_share\"}")
        .await?;
    ensure!(shares >= 6.0, "refusals over a share counted: {shares}");
    // Nine flows held by the greedy three: the neighbour's connection still opens.
    let body = setup
        .lab
        .probe(&neighbour.netns, &["http", &format!("http://{http}/")])?;
    ensure!(
        body == "cluster",
        "the neighbour's HTTP while three peers hold their share: {body:?}"
    );
    // A fifth peer arrives: the share shrinks to two flows, and each greedy peer gives
    // back the third.
    gefyra_e2e::create_client(admin.clone(), &ns, "late").await?;
    gefyra_e2e::wait_for_ready(&setup.clients, "late").await?;
    let (private, public) = key_pair();
    let active = connect(&setup.clients, "late", json!({ "publicKey": public })).await?;
    let config = PeerConfig::of(&active, Some(&private))?;
    let _late = tokio::task::block_in_place(|| Attacker::connect(&config, stowaway_address))?;
    let stowaway = &setup.stowaway;
    eventually("each greedy peer gave back a flow", WAIT, || async {
        let given_back = stowaway
            .metric("gefyra_stowaway_flow_expiries_total{protocol=\"tcp\",timeout=\"over_share\"}")
            .await?;
        let live = stowaway.metric("gefyra_stowaway_live_peers").await?;
        Ok((live == 5.0 && given_back == 3.0).then_some(()))
    })
    .await?;
    ensure!(setup.stowaway.process.is_running(), "Stowaway still runs");
    Ok(())
}

/// The tunnel address the operator gave client `name`.
async fn tunnel_address(setup: &Deployment, name: &str) -> Result<IpAddr> {
    let client = setup.clients.get(name).await?;
    let config = gefyra_api::connection::ProviderConfig::parse(
        client
            .provider_config
            .as_ref()
            .context("an ACTIVE client has a providerConfig")?,
    )?;
    Ok(config.address)
}

/// What comes back on a connection to Stowaway's bridges port that sent `preamble`, then
/// `request`: the response read to the end, or nothing if Stowaway closed (or reset) it.
async fn over_bridge(port: u16, preamble: &[u8], request: &[u8]) -> Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(preamble).await?;
    if stream.write_all(request).await.is_err() {
        // Refused already: closed with our bytes unread, so reset.
        return Ok(Vec::new());
    }
    let mut response = Vec::new();
    match tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut response)).await {
        Ok(Ok(_)) => Ok(response),
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionReset => Ok(response),
        Ok(Err(error)) => Err(error.into()),
        Err(_) => anyhow::bail!("the bridges port neither answered nor closed within 20 s"),
    }
}

/// The body of an HTTP response (after the blank line).
fn body(response: &[u8]) -> &[u8] {
    response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map_or(&[], |at| &response[at + 4..])
}

/// Bridges: a connection on the bridges port naming an ACTIVE GefyraBridge and a port it
/// maps goes through the tunnel to the bridge's own client, bytes both ways. Whatever a
/// bridge object says, nothing else is reached: a bridge of client A that points at B's
/// tunnel address or at a cluster address, a bridge not ACTIVE, an unknown bridge, an
/// unmapped port, garbage, an oversized or unfinished preamble are closed and counted by
/// reason, and no connection reaches a server; the peer's flow limits hold for bridged
/// flows; Stowaway keeps serving throughout.
#[tokio::test]
async fn a_bridge_reaches_its_own_clients_peer_and_nothing_else() -> Result<()> {
    use kube::Api;
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind, PostParams};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let cluster = Cluster::from_env().await?;
    let extra = ["--peer-max-tcp-flows", "2"].map(String::from);
    let mut setup = Deployment::start(&cluster, "bridges", &extra).await?;
    setup.stowaway.wait_ready().await?;
    let a = setup
        .connected_peer("a", json!({ "subnet": "172.25.200.0/24" }), true)
        .await?;
    let b = setup
        .connected_peer("b", json!({ "subnet": "172.25.201.0/24" }), true)
        .await?;
    setup.reaches_the_cluster(&a.netns).await?;
    setup.reaches_the_cluster(&b.netns).await?;
    let address_a = tunnel_address(&setup, "a").await?;
    let address_b = tunnel_address(&setup, "b").await?;
    setup.lab.serve(&a.netns, address_a, "peer-a")?;
    setup.lab.serve(&b.netns, address_b, "peer-b")?;
    let cluster_address = IpAddr::V4(setup.lab.cluster_address());
    let cluster_netns = setup.lab.cluster_netns();
    // These bridges are written ACTIVE by the admin, with no mount (there is no node to run
    // a router): the operator, which would put them in ERROR (MountNotFound), goes. The
    // peers stay (Stowaway follows their clients, which stay ACTIVE).
    setup.operator.kill().await?;

    let ns = setup.clients.namespace().context("namespaced")?.to_string();
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gefyra.dev", "v1", "gefyrabridge"),
        "gefyrabridges",
    );
    let bridges: Api<DynamicObject> =
        Api::namespaced_with(setup.clients.clone().into_client(), &ns, &resource);
    // `to-a` last: once it is served, Stowaway has seen the others (one watch, in order).
    for (name, destination, state) in [
        ("a-to-b", address_b, "ACTIVE"),
        ("a-to-cluster", cluster_address, "ACTIVE"),
        ("requested", address_a, "REQUESTED"),
        ("to-a", address_a, "ACTIVE"),
    ] {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "gefyra.dev/v1",
            "kind": "gefyrabridge",
            "metadata": {
                "name": name,
                "labels": {"gefyra.dev/client": "a", "gefyra.dev/bridge-mount": "web-mount"},
            },
            "provider": "carrier2",
            "client": "a",
            "target": "web-mount",
            "destinationIP": destination.to_string(),
            "portMappings": ["8080:80"],
            "state": state,
        }))?;
        bridges.create(&PostParams::default(), &object).await?;
    }

    let port = setup.stowaway.bridges_port;
    let get = b"GET / HTTP/1.0\r\nHost: web\r\n\r\n";
    let stowaway = &setup.stowaway;
    eventually("bridge to-a reaches peer a", WAIT, || async {
        let response = over_bridge(port, b"GEFYRA-BRIDGE/1 to-a 80\n", get).await?;
        Ok((body(&response) == b"peer-a").then_some(()))
    })
    .await
    .with_context(|| stowaway.process.log_text())?;
    let mut bridged = 1.0;

    // An unfinished preamble (slowloris) is held for 5 s at most; meanwhile Stowaway
    // serves the others.
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    slow.write_all(b"GEFYRA-BRIDGE/1 to-a").await?;
    let slow_since = std::time::Instant::now();

    // Bytes both ways: 200,000 up, 1,000,000 down.
    let upload = vec![b'u'; 200_000];
    let mut post = format!(
        "POST /count HTTP/1.0\r\nHost: web\r\nContent-Length: {}\r\n\r\n",
        upload.len()
    )
    .into_bytes();
    post.extend_from_slice(&upload);
    let response = over_bridge(port, b"GEFYRA-BRIDGE/1 to-a 80\n", &post).await?;
    ensure!(
        body(&response) == b"200000",
        "the upload through the bridge: {:?}",
        String::from_utf8_lossy(&response)
    );
    let response = over_bridge(
        port,
        b"GEFYRA-BRIDGE/1 to-a 80\n",
        b"GET /bytes/1000000 HTTP/1.0\r\nHost: web\r\n\r\n",
    )
    .await?;
    ensure!(
        body(&response).len() == 1_000_000,
        "the download through the bridge: {} bytes",
        body(&response).len()
    );
    bridged += 2.0;

    // What each server accepted before (as the server counts; each probe is one more).
    let lab = &setup.lab;
    let accepted = |netns: &str, address: IpAddr| -> Result<u64> {
        Ok(lab
            .probe(
                netns,
                &["http", &format!("http://{address}:8080/connections")],
            )?
            .parse()?)
    };
    let servers = [
        (a.netns.as_str(), address_a),
        (b.netns.as_str(), address_b),
        (cluster_netns.as_str(), cluster_address),
    ];
    let mut before = Vec::new();
    for (netns, address) in servers {
        before.push(accepted(netns, address)?);
    }
    let refused = async |reason: &str| {
        stowaway
            .metric(&format!(
                "gefyra_stowaway_bridge_connections_refused_total{{reason=\"{reason}\"}}"
            ))
            .await
    };
    let oversized = format!("GEFYRA-BRIDGE/1 {}", "a".repeat(300));
    let attempts: [(&str, &[u8], &str); 8] = [
        (
            "another client's address",
            b"GEFYRA-BRIDGE/1 a-to-b 80\n",
            "foreign_destination",
        ),
        (
            "a cluster address",
            b"GEFYRA-BRIDGE/1 a-to-cluster 80\n",
            "foreign_destination",
        ),
        (
            "a bridge not ACTIVE",
            b"GEFYRA-BRIDGE/1 requested 80\n",
            "not_active",
        ),
        (
            "an unknown bridge",
            b"GEFYRA-BRIDGE/1 nope 80\n",
            "unknown_bridge",
        ),
        (
            "an unmapped port",
            b"GEFYRA-BRIDGE/1 to-a 8080\n",
            "unmapped_port",
        ),
        ("garbage", b"GET / HTTP/1.1\r\n", "malformed_preamble"),
        (
            "another version",
            b"GEFYRA-BRIDGE/2 to-a 80\n",
            "malformed_preamble",
        ),
        (
            "an oversized preamble",
            oversized.as_bytes(),
            "oversized_preamble",
        ),
    ];
    for (what, preamble, reason) in attempts {
        let counted = refused(reason).await?;
        let response = over_bridge(port, preamble, get).await?;
        ensure!(
            response.is_empty(),
            "{what}: answered {:?}",
            String::from_utf8_lossy(&response)
        );
        let now = refused(reason).await?;
        ensure!(now == counted + 1.0, "{what}: {reason} {counted} -> {now}");
    }
    for ((netns, address), before) in servers.into_iter().zip(before) {
        let after = accepted(netns, address)?;
        ensure!(
            after == before + 1,
            "only the probe reached {address} in {netns}: {before} -> {after}"
        );
    }

    // The unfinished preamble is closed at its timeout, not before.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    let held = slow_since.elapsed();
    ensure!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))) && rest.is_empty(),
        "the unfinished preamble: {read:?} {rest:?}"
    );
    ensure!(
        held >= Duration::from_millis(4_500),
        "closed after {held:?}"
    );
    ensure!(refused("preamble_timeout").await? == 1.0, "counted");

    // The peer's flow limits hold for bridged flows: two held open (a request not
    // finished), a third is refused, and once they end another goes through.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GEFYRA-BRIDGE/1 to-a 80\nGET / HTTP/1.0\r\n")
            .await?;
        held.push(stream);
    }
    let total = "gefyra_stowaway_bridge_connections_total";
    eventually("both held flows are bridged", WAIT, || async {
        Ok((stowaway.metric(total).await? == bridged + 2.0).then_some(()))
    })
    .await?;
    bridged += 2.0;
    let limited = refused("flow_refused").await?;
    let response = over_bridge(port, b"GEFYRA-BRIDGE/1 to-a 80\n", get).await?;
    ensure!(
        response.is_empty(),
        "a third flow while two are held: answered {:?}",
        String::from_utf8_lossy(&response)
    );
    let now = refused("flow_refused").await?;
    ensure!(now == limited + 1.0, "flow_refused {limited} -> {now}");
    drop(held);
    eventually("bridged again once the held flows end", WAIT, || async {
        let response = over_bridge(port, b"GEFYRA-BRIDGE/1 to-a 80\n", get).await?;
        Ok((body(&response) == b"peer-a").then_some(()))
    })
    .await?;
    bridged += 1.0;

    let accepted_total = stowaway.metric(total).await?;
    ensure!(
        accepted_total == bridged,
        "bridged connections counted: {accepted_total}, expected {bridged}"
    );
    ensure!(
        refused("foreign_destination").await? == 2.0,
        "refusals for foreign destinations"
    );
    // The peers' own traffic was never disturbed.
    setup.reaches_the_cluster(&a.netns).await?;
    setup.reaches_the_cluster(&b.netns).await?;
    ensure!(setup.stowaway.process.is_running(), "Stowaway still runs");
    Ok(())
}
