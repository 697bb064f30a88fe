//! Connect and disconnect against the real control plane: exclusive ranges decided by the
//! API server, pool exhaustion, reconnects, and two operators with a crash in between.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine;
use gefyra_api::ipam;
use gefyra_api::{ClientState, GefyraClient};
use gefyra_e2e::set_provider_parameter as connect;
use gefyra_e2e::{
    Cluster, Operator, WAIT, api_status, create_client, eventually, install_crd, wait_for_ready,
    wait_for_state, wait_gone,
};
use gefyra_operator::allocator;
use ipnet::IpNet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

/// Every range held in the API server, as (client, range): one per tunnel-address claim
/// (read from the Leases themselves) and one per route.
async fn holdings(admin: Client, namespace: &str) -> Result<Vec<(String, IpNet)>> {
    let leases = Api::<Lease>::namespaced(admin.clone(), namespace)
        .list(&ListParams::default().labels(allocator::CLAIM_SELECTOR))
        .await?;
    let mut held = Vec::new();
    for lease in &leases.items {
        let (address, _) = allocator::claimed(lease).context("a readable claim")?;
        ensure!(lease.metadata.name.as_deref() == Some(allocator::claim_name(address).as_str()));
        let client = lease
            .labels()
            .get(allocator::CLIENT_LABEL)
            .context("a client label")?;
        held.push((client.clone(), IpNet::from(address)));
    }
    for (client, route) in gefyra_operator::routes::read_routes(&admin, namespace).await? {
        held.push((client, route.subnet));
    }
    Ok(held)
}

/// What `client` holds.
fn held_by(held: &[(String, IpNet)], client: &str) -> Vec<IpNet> {
    held.iter()
        .filter(|(holder, _)| holder == client)
        .map(|(_, range)| *range)
        .collect()
}

fn config_text<'a>(client: &'a GefyraClient, key: &str) -> Option<&'a str> {
    client.provider_config.as_ref()?.get(key)?.as_str()
}

fn public_key_of(private: &str) -> Result<String> {
    gefyra_api::wireguard::public_key_of(private).context("a private key is base64 of 32 bytes")
}

fn message_of(client: &GefyraClient) -> String {
    client
        .ready_condition()
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

fn reason_of(client: &GefyraClient) -> Option<String> {
    client.ready_condition().map(|ready| ready.reason.clone())
}

#[tokio::test]
async fn connect_disconnect_reconnect_and_delete_while_active() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("connect").await?;
    let admin = cluster.admin()?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);

    // Before the operator runs the client is REQUESTED: connecting is refused with a reason.
    create_client(admin.clone(), &ns, "dev").await?;
    let refused = connect(&clients, "dev", json!({"subnet": "172.20.0.0/16"}))
        .await
        .unwrap_err();
    let refused = refused
        .downcast_ref::<kube::Error>()
        .context("an API error")?;
    ensure!(
        api_status(refused) == Some(422) && refused.to_string().contains("may change only while"),
        "{refused}"
    );

    let _operator = Operator::start(
        &cluster,
        &ns,
        &["--wireguard-endpoint", "203.0.113.7:31820"],
    )?;
    wait_for_ready(&clients, "dev").await?;

    // Our way: the client keeps its private key.
    let own_public = public_key_of(&base64::engine::general_purpose::STANDARD.encode([7u8; 32]))?;
    connect(&clients, "dev", json!({"publicKey": own_public})).await?;
    let active = wait_for_state(&clients, "dev", ClientState::Active).await?;
    let server = Api::<Secret>::namespaced(admin.clone(), &ns)
        .get("gefyra-stowaway-key")
        .await?;
    let server_public = String::from_utf8(server.data.unwrap_or_default()["publicKey"].0.clone())?;
    ensure!(config_text(&active, "Peer.PublicKey") == Some(server_public.as_str()));
    ensure!(config_text(&active, "Interface.PublicKey") == Some(own_public.as_str()));
    ensure!(
        config_text(&active, "Interface.PrivateKey").is_none(),
        "no private key is written when the client sent its public key"
    );
    ensure!(config_text(&active, "Interface.DNS") == Some("192.168.99.1"));
    ensure!(config_text(&active, "Peer.Endpoint") == Some("203.0.113.7:31820"));
    let address = config_text(&active, "Interface.Address").context("an address")?;
    let held = holdings(admin.clone(), &ns).await?;
    ensure!(
        held_by(&held, "dev") == [IpNet::from(address.parse::<std::net::IpAddr>()?)],
        "dev holds exactly the published address: {held:?}"
    );

    // Disconnect: WAITING, no config, nothing allocated.
    connect(&clients, "dev", Value::Null).await?;
    let waiting = eventually("dev is disconnected", WAIT, || async {
        let client = clients.get("dev").await?;
        Ok(
            (client.state == ClientState::Waiting && client.provider_config.is_none())
                .then_some(client),
        )
    })
    .await?;
    ensure!(waiting.state_transitions.contains_key("DISABLING"));
    ensure!(holdings(admin.clone(), &ns).await?.is_empty());

    // Gefyra's way: only a subnet; the operator generates the key pair.
    connect(&clients, "dev", json!({"subnet": "172.20.0.0/16"})).await?;
    let again = wait_for_state(&clients, "dev", ClientState::Active).await?;
    let private = config_text(&again, "Interface.PrivateKey").context("a generated key")?;
    ensure!(Some(public_key_of(private)?.as_str()) == config_text(&again, "Interface.PublicKey"));
    let held = holdings(admin.clone(), &ns).await?;
    let address: IpNet = config_text(&again, "Interface.Address")
        .context("an address")?
        .parse::<std::net::IpAddr>()?
        .into();
    ensure!(
        held_by(&held, "dev") == [address, "172.20.0.0/16".parse()?],
        "dev holds its address and its subnet: {held:?}"
    );
    let log = _operator.log_text();
    ensure!(
        !log.contains(private),
        "the private key never reaches the log"
    );

    // Deleting an ACTIVE client releases its ranges.
    clients.delete("dev", &DeleteParams::default()).await?;
    wait_gone(&clients, "dev").await?;
    ensure!(holdings(admin, &ns).await?.is_empty(), "released on delete");
    Ok(())
}

#[tokio::test]
async fn a_pool_of_four_serves_four_and_the_next_connects_when_one_leaves() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("pool").await?;
    let admin = cluster.admin()?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
    // Two /30s: two usable addresses each.
    let _operator = Operator::start(
        &cluster,
        &ns,
        &["--tunnel-pool", "10.99.0.0/30,10.99.0.4/30"],
    )?;
    let names: Vec<String> = (0..6).map(|i| format!("c{i}")).collect();
    for name in &names {
        create_client(admin.clone(), &ns, name).await?;
    }
    for name in &names {
        wait_for_ready(&clients, name).await?;
        connect(&clients, name, json!({})).await?;
    }
    let settled = eventually("4 ACTIVE and 2 PoolExhausted", WAIT, || async {
        let listed = clients.list(&Default::default()).await?.items;
        let active = listed
            .iter()
            .filter(|c| c.state == ClientState::Active)
            .count();
        let exhausted = listed
            .iter()
            .filter(|c| {
                c.state == ClientState::Error && reason_of(c).as_deref() == Some("PoolExhausted")
            })
            .count();
        Ok((active == 4 && exhausted == 2).then_some(listed))
    })
    .await?;
    let addresses: std::collections::BTreeSet<_> = settled
        .iter()
        .filter_map(|c| config_text(c, "Interface.Address"))
        .collect();
    ensure!(
        addresses == ["10.99.0.1", "10.99.0.2", "10.99.0.5", "10.99.0.6"].into(),
        "four distinct host addresses, no network or broadcast address: {addresses:?}"
    );
    let waiting_one = settled
        .iter()
        .find(|c| c.state == ClientState::Error)
        .context("an exhausted client")?;
    let message = message_of(waiting_one);
    ensure!(message.contains("pool is exhausted"), "{message}");

    let leaving = settled
        .iter()
        .find(|c| c.state == ClientState::Active)
        .context("an active client")?;
    connect(
        &clients,
        &leaving.metadata.name.clone().unwrap_or_default(),
        Value::Null,
    )
    .await?;
    eventually(
        "the next client connects on the freed address",
        WAIT,
        || async {
            let listed = clients.list(&Default::default()).await?.items;
            let active = listed
                .iter()
                .filter(|c| c.state == ClientState::Active)
                .count();
            let errors = listed
                .iter()
                .filter(|c| c.state == ClientState::Error)
                .count();
            Ok((active == 4 && errors == 1).then_some(()))
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn two_operators_and_a_crash_never_hand_out_overlapping_ranges() -> Result<()> {
    const N: usize = 200;
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("exclusive").await?;
    let admin = cluster.admin()?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
    // No leader election: both reconcile everything, only the API server keeps them apart.
    let mut first = Operator::start(&cluster, &ns, &[])?;
    let _second = Operator::start(&cluster, &ns, &[])?;

    let names: Vec<String> = (0..N).map(|i| format!("peer-{i:03}")).collect();
    futures::future::try_join_all(
        names
            .iter()
            .map(|name| create_client(admin.clone(), &ns, name)),
    )
    .await?;
    for name in &names {
        wait_for_ready(&clients, name).await?;
    }
    // Half ask for 10.i.0.0/16, the other half for 10.i.128.0/17: pairs that overlap.
    let subnet = |i: usize| {
        if i < N / 2 {
            format!("10.{i}.0.0/16")
        } else {
            format!("10.{}.128.0/17", i - N / 2)
        }
    };
    let connects = names
        .iter()
        .enumerate()
        .map(|(i, name)| connect(&clients, name, json!({ "subnet": subnet(i) })));
    let connecting = futures::future::try_join_all(connects);
    let crash = async {
        eventually("some clients are ACTIVE", WAIT, || async {
            let listed = clients.list(&Default::default()).await?.items;
            let active = listed
                .iter()
                .filter(|c| c.state == ClientState::Active)
                .count();
            Ok((active >= N / 8).then_some(()))
        })
        .await?;
        first.kill().await
    };
    let (connected, crashed) = tokio::join!(connecting, crash);
    connected?;
    crashed?;

    let settled = eventually(
        "every client is ACTIVE or rejected",
        Duration::from_secs(180),
        || async {
            let listed = clients.list(&Default::default()).await?.items;
            let done = listed.iter().all(|c| {
                c.state == ClientState::Active
                    || (c.state == ClientState::Error
                        && reason_of(c).as_deref() == Some("SubnetConflict"))
            });
            Ok(done.then_some(listed))
        },
    )
    .await?;
    // Every range held, of ACTIVE clients or not (two operators may both have claimed an
    // address for one client; the spare one is released with the client).
    let live = holdings(admin.clone(), &ns).await?;
    for client in settled.iter().filter(|c| c.state == ClientState::Active) {
        let name = client.metadata.name.clone().unwrap_or_default();
        let address: IpNet = config_text(client, "Interface.Address")
            .with_context(|| format!("ACTIVE {name} has an address"))?
            .parse::<std::net::IpAddr>()?
            .into();
        ensure!(
            held_by(&live, &name).contains(&address),
            "ACTIVE {name} holds the address of its config ({address})"
        );
    }
    for (i, (a_name, a)) in live.iter().enumerate() {
        for (b_name, b) in &live[i + 1..] {
            ensure!(!ipam::overlaps(a, b), "{a_name} {a} overlaps {b_name} {b}");
        }
    }
    for pair in 0..N / 2 {
        let states: Vec<ClientState> = [pair, pair + N / 2]
            .iter()
            .map(|&i| {
                settled
                    .iter()
                    .find(|c| c.metadata.name.as_deref() == Some(names[i].as_str()))
                    .map(|c| c.state)
                    .unwrap_or(ClientState::Error)
            })
            .collect();
        ensure!(
            states.iter().filter(|s| **s == ClientState::Active).count() == 1,
            "exactly one of {} and {} holds 10.{pair}.x: {states:?}",
            names[pair],
            names[pair + N / 2]
        );
    }
    for rejected in settled.iter().filter(|c| c.state == ClientState::Error) {
        let message = rejected
            .ready_condition()
            .map(|c| c.message.clone())
            .unwrap_or_default();
        ensure!(
            message.contains("overlaps another client's range"),
            "{message}"
        );
    }

    // Everyone disconnects and is deleted: nothing stays allocated.
    for name in &names {
        connect(&clients, name, Value::Null).await?;
    }
    let delete = DeleteParams::default();
    futures::future::try_join_all(names.iter().map(|name| clients.delete(name, &delete))).await?;
    for name in &names {
        wait_gone(&clients, name).await?;
    }
    // Spare claims of a client whose releasing operator did not see them yet go with the
    // client: they are owned by it (garbage collector) and swept.
    eventually("no range is held any more", WAIT, || async {
        Ok(holdings(admin.clone(), &ns).await?.is_empty().then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn an_ipv6_pool_hands_out_ipv6_addresses_and_routes_do_not_overlap() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("ipv6").await?;
    let admin = cluster.admin()?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
    // fd00:99::/126: three client addresses (never the network address).
    let _operator = Operator::start(&cluster, &ns, &["--tunnel-pool", "fd00:99::/126"])?;
    let requests = [
        ("a", json!({"subnet": "fd00:aaaa::/64"})),
        ("b", json!({"subnet": "fd00:aaaa:0:0:1::/80"})),
        ("c", json!({})),
        ("d", json!({"subnet": "fd00:bbbb::/48"})),
    ];
    for (name, _) in &requests {
        create_client(admin.clone(), &ns, name).await?;
    }
    for (name, parameter) in &requests {
        wait_for_ready(&clients, name).await?;
        connect(&clients, name, parameter.clone()).await?;
        if *name == "a" {
            // a's subnet first, so that b's (inside it) is the one refused.
            wait_for_state(&clients, "a", ClientState::Active).await?;
        }
    }
    let settled = eventually("a, c, d ACTIVE and b refused", WAIT, || async {
        let listed = clients.list(&Default::default()).await?.items;
        let state = |name: &str| {
            listed
                .iter()
                .find(|c| c.metadata.name.as_deref() == Some(name))
                .map(|c| c.state)
        };
        let done = ["a", "c", "d"]
            .iter()
            .all(|name| state(name) == Some(ClientState::Active))
            && state("b") == Some(ClientState::Error);
        Ok(done.then_some(listed))
    })
    .await?;
    let mut addresses = std::collections::BTreeSet::new();
    for client in settled.iter().filter(|c| c.state == ClientState::Active) {
        let address = config_text(client, "Interface.Address").context("an address")?;
        ensure!(
            config_text(client, "Peer.AllowedIPs")
                .is_some_and(|allowed| allowed.starts_with("::/0")),
            "an IPv6 peer routes IPv6 first"
        );
        addresses.insert(address.to_string());
    }
    ensure!(
        addresses
            == ["fd00:99::1", "fd00:99::2", "fd00:99::3"]
                .map(String::from)
                .into(),
        "three distinct IPv6 addresses, not the network address: {addresses:?}"
    );
    let refused = settled
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some("b"))
        .context("b")?;
    let message = message_of(refused);
    ensure!(
        reason_of(refused).as_deref() == Some("SubnetConflict")
            && message.contains("overlaps another client's range"),
        "{message}"
    );
    let held = holdings(admin.clone(), &ns).await?;
    ensure!(held.len() == 5, "3 addresses and 2 routes: {held:?}");
    ensure!(held_by(&held, "d").contains(&"fd00:bbbb::/48".parse()?));

    let delete = DeleteParams::default();
    for (name, _) in &requests {
        clients.delete(name, &delete).await?;
    }
    for (name, _) in &requests {
        wait_gone(&clients, name).await?;
    }
    ensure!(
        holdings(admin, &ns).await?.is_empty(),
        "nothing held after delete"
    );
    Ok(())
}

/// The clients the routes table's shard `shard` shows, read from the API server.
async fn shard_clients(admin: &Client, namespace: &str, shard: &str) -> Result<Vec<String>> {
    let shard = Api::<ConfigMap>::namespaced(admin.clone(), namespace)
        .get_opt(shard)
        .await?;
    Ok(shard
        .and_then(|shard| shard.data)
        .unwrap_or_default()
        .into_keys()
        .collect())
}

/// Route changes one process makes into one shard at the same moment go out together (one
/// compare-and-swap carries what is queued): of overlapping pairs asked for at once exactly
/// one of each is recorded, the others are refused naming the overlap, and the shard holds
/// exactly what was admitted — then all of it is removed at once.
#[tokio::test]
async fn concurrent_routes_into_one_shard_are_written_together_and_stay_exclusive() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    let ns = cluster.namespace("batched").await?;
    let admin = cluster.admin()?;
    let tables = gefyra_operator::routes::RouteTables::new(admin.clone(), &ns);
    let pool = ipam::Pool::default();
    let asked: Vec<(String, IpNet)> = (0..10)
        .flat_map(|x| {
            [
                (format!("wide-{x}"), format!("10.1.{x}.0/24")),
                (format!("narrow-{x}"), format!("10.1.{x}.0/25")),
            ]
        })
        .map(|(name, subnet)| Ok((name, subnet.parse()?)))
        .collect::<Result<_>>()?;
    let results = futures::future::join_all(
        asked
            .iter()
            .map(|(name, subnet)| tables.set_route(&pool, name, name, *subnet)),
    )
    .await;
    let mut admitted = Vec::new();
    for ((name, _), result) in asked.iter().zip(results) {
        match result? {
            Ok(()) => admitted.push(name.clone()),
            Err(refused) => ensure!(
                refused.to_string().contains("overlaps"),
                "{name}: refused for another reason: {refused}"
            ),
        }
    }
    for x in 0..10 {
        let pair = [format!("wide-{x}"), format!("narrow-{x}")];
        let held = pair.iter().filter(|name| admitted.contains(name)).count();
        ensure!(held == 1, "pair {x}: {held} of wide and narrow recorded");
    }
    let mut recorded = shard_clients(&admin, &ns, "gefyra-routes-v4-10-1").await?;
    recorded.sort();
    admitted.sort();
    ensure!(
        recorded == admitted,
        "recorded {recorded:?}, admitted {admitted:?}"
    );

    futures::future::try_join_all(admitted.iter().map(|name| tables.remove_route(name))).await?;
    let left = shard_clients(&admin, &ns, "gefyra-routes-v4-10-1").await?;
    ensure!(left.is_empty(), "left after removing every route: {left:?}");
    Ok(())
}

#[tokio::test]
async fn a_route_over_several_shards_is_exclusive_in_each_and_a_refusal_leaves_nothing()
-> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("shards").await?;
    let admin = cluster.admin()?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
    let _operator = Operator::start(&cluster, &ns, &[])?;
    for name in ["wide", "narrow", "wider", "huge"] {
        create_client(admin.clone(), &ns, name).await?;
        wait_for_ready(&clients, name).await?;
    }
    // 172.18.0.0/15 is recorded in the shards of 172.18/16 and 172.19/16.
    connect(&clients, "wide", json!({"subnet": "172.18.0.0/15"})).await?;
    wait_for_state(&clients, "wide", ClientState::Active).await?;
    for shard in ["gefyra-routes-v4-172-18", "gefyra-routes-v4-172-19"] {
        let shown = shard_clients(&admin, &ns, shard).await?;
        ensure!(shown == ["wide"], "{shard}: {shown:?}");
    }
    // A narrow route in its second shard is refused, naming no one.
    connect(&clients, "narrow", json!({"subnet": "172.19.5.0/24"})).await?;
    let narrow = wait_for_state(&clients, "narrow", ClientState::Error).await?;
    ensure!(reason_of(&narrow).as_deref() == Some("SubnetConflict"));
    let message = message_of(&narrow);
    ensure!(
        message.contains("another client's range") && !message.contains("wide"),
        "{message}"
    );
    // A wider route over 172.16/16 … 172.19/16 is refused by the shards it shares with the
    // wide one, and nothing of it is left in the others.
    connect(&clients, "wider", json!({"subnet": "172.16.0.0/14"})).await?;
    let wider = wait_for_state(&clients, "wider", ClientState::Error).await?;
    ensure!(reason_of(&wider).as_deref() == Some("SubnetConflict"));
    eventually(
        "the refused route is given back in every shard",
        WAIT,
        || async {
            let mut shown = Vec::new();
            for shard in ["gefyra-routes-v4-172-16", "gefyra-routes-v4-172-17"] {
                shown.extend(shard_clients(&admin, &ns, shard).await?);
            }
            Ok(shown.is_empty().then_some(()))
        },
    )
    .await?;
    // It stops asking (else its retries would take 172.16.0.0/12 once the wide route goes).
    connect(&clients, "wider", Value::Null).await?;
    wait_for_state(&clients, "wider", ClientState::Waiting).await?;
    // Wider than 4 shards: refused by its form, saying how wide a route may be.
    connect(&clients, "huge", json!({"subnet": "172.16.0.0/12"})).await?;
    let huge = wait_for_state(&clients, "huge", ClientState::Error).await?;
    ensure!(reason_of(&huge).as_deref() == Some("InvalidParameter"));
    let message = message_of(&huge);
    ensure!(message.contains("wider than /14"), "{message}");
    // Once the wide route goes, the narrow one connects (asked again: its retries back off).
    connect(&clients, "wide", Value::Null).await?;
    wait_for_state(&clients, "wide", ClientState::Waiting).await?;
    connect(&clients, "narrow", Value::Null).await?;
    wait_for_state(&clients, "narrow", ClientState::Waiting).await?;
    connect(&clients, "narrow", json!({"subnet": "172.19.5.0/24"})).await?;
    wait_for_state(&clients, "narrow", ClientState::Active).await?;
    ensure!(
        shard_clients(&admin, &ns, "gefyra-routes-v4-172-18")
            .await?
            .is_empty()
    );
    ensure!(shard_clients(&admin, &ns, "gefyra-routes-v4-172-19").await? == ["narrow"]);
    Ok(())
}

#[tokio::test]
async fn the_single_routes_table_of_earlier_versions_is_moved_into_shards() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("legacy-routes").await?;
    let admin = cluster.admin()?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
    // Before this operator ran: an earlier one routed 172.30.0.0/16 to "old" in one table
    // (a client's providerParameter cannot be set before an operator set it up).
    create_client(admin.clone(), &ns, "old").await?;
    let uid = clients.get("old").await?.uid().context("a uid")?;
    let route = json!({"uid": uid, "subnet": "172.30.0.0/16"}).to_string();
    let legacy: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": gefyra_api::route_shards::LEGACY_TABLE, "namespace": ns},
        "data": {"old": route},
    }))?;
    let config_maps = Api::<ConfigMap>::namespaced(admin.clone(), &ns);
    config_maps.create(&Default::default(), &legacy).await?;

    let _operator = Operator::start(&cluster, &ns, &[])?;
    wait_gone(&config_maps, gefyra_api::route_shards::LEGACY_TABLE).await?;
    ensure!(shard_clients(&admin, &ns, "gefyra-routes-v4-172-30").await? == ["old"]);
    wait_for_ready(&clients, "old").await?;
    connect(&clients, "old", json!({"subnet": "172.30.0.0/16"})).await?;
    wait_for_state(&clients, "old", ClientState::Active).await?;
    // The moved route is still exclusive.
    create_client(admin.clone(), &ns, "new").await?;
    wait_for_ready(&clients, "new").await?;
    connect(&clients, "new", json!({"subnet": "172.30.1.0/24"})).await?;
    let new = wait_for_state(&clients, "new", ClientState::Error).await?;
    ensure!(reason_of(&new).as_deref() == Some("SubnetConflict"));
    Ok(())
}
