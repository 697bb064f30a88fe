//! Connecting and disconnecting a client: its routed range and tunnel address (recorded in
//! the API server before any configuration is published), its `providerConfig`, and the
//! state transitions on the way.

use gefyra_api::connection::{ProviderConfig, ProviderParameter, WireGuardKey, cluster_ranges};
use gefyra_api::ipam::{Allocation, IpamError};
use gefyra_api::{ClientState, GefyraClient};
use jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use serde_json::json;
use tracing::{info, warn};

use crate::allocator::ClaimError;
use crate::connection;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::lifecycle::enter_action;
use crate::lifecycle::{self, Connection};
use crate::routes::Refused;

/// How long a disconnect waits after releasing the client's bridges before its peer goes:
/// the routers follow the bridges by watch (milliseconds), so in-flight bridged requests
/// finish through the tunnel and new ones already reach the original.
const ROUTERS_FOLLOW_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Records the state `to` (coming from `from`) with any `extra` fields in one patch, then
/// logs it and posts a `StateChanged` Event (with `note`, if any). Returns the generation
/// written.
pub async fn transition(
    client: &GefyraClient,
    from: ClientState,
    to: ClientState,
    extra: serde_json::Value,
    note: &str,
    ctx: &Context,
) -> Result<Option<i64>> {
    let generation = record_transition(client, from, to, extra, ctx).await?;
    announce_transition(client, from, to, note, ctx).await;
    Ok(generation)
}

/// The patch and log line of [`transition`].
async fn record_transition(
    client: &GefyraClient,
    from: ClientState,
    to: ClientState,
    extra: serde_json::Value,
    ctx: &Context,
) -> Result<Option<i64>> {
    let name = client.name_any();
    let mut patch = lifecycle::enter(to, Timestamp::now());
    if let (Some(patch), serde_json::Value::Object(extra)) = (patch.as_object_mut(), extra) {
        patch.extend(extra);
    }
    let patched = ctx
        .patch_client(client, false, patch, |source| Error::RecordState {
            client: name.clone(),
            state: to,
            source,
        })
        .await?;
    info!(client = %name, %from, %to, "state changed");
    Ok(patched.metadata.generation)
}

/// The `StateChanged` Event of [`transition`] (best effort: a failure is logged).
async fn announce_transition(
    client: &GefyraClient,
    from: ClientState,
    to: ClientState,
    note: &str,
    ctx: &Context,
) {
    let message = match note {
        "" => format!("{from} -> {to}"),
        note => format!("{from} -> {to}: {note}"),
    };
    ctx.event(
        client,
        EventType::Normal,
        "StateChanged",
        &enter_action(to),
        message,
    )
    .await;
}

/// What the connection step left behind.
pub struct Connected {
    /// When `maxConnectionAge` ends the connection.
    pub due: Option<Timestamp>,
    pub connected: bool,
    /// The generation of the client as last written (`None`: nothing written).
    pub generation: Option<i64>,
}

impl Connected {
    fn not(generation: Option<i64>) -> Self {
        Self {
            due: None,
            connected: false,
            generation,
        }
    }
}

/// The connection state machine, doing what [`lifecycle::next`] decided for a client now in
/// `state`: `providerParameter` set → ENABLING → ACTIVE (route and tunnel-address claim
/// recorded before any configuration is published); unset → DISABLING → WAITING (ranges
/// released).
pub async fn connect_or_disconnect(
    client: &GefyraClient,
    state: ClientState,
    step: Connection,
    ctx: &Context,
    now: Timestamp,
) -> Result<Connected> {
    match step {
        Connection::Idle => Ok(Connected::not(None)),
        Connection::GiveBackFailedConnect => {
            // A connect that failed (ERROR) may have recorded a route or a claim first.
            release(client, ctx).await?;
            Ok(Connected::not(None))
        }
        Connection::Disconnect { enter_disabling } => {
            // Its bridges first: the routers send new connections to the originals while
            // the tunnel still carries what is in flight (Stowaway drops the
            // peer once the client leaves ACTIVE).
            let name = client.name_any();
            match crate::bridging::bridge::release_bridges_of(ctx, &name, "its client disconnected")
                .await
            {
                Ok(0) => {}
                Ok(released) => {
                    info!(client = %name, released, "bridges released before the disconnect");
                    tokio::time::sleep(ROUTERS_FOLLOW_WITHIN).await;
                }
                Err(error) => {
                    warn!(client = %name, %error, "releasing the bridges before the disconnect failed; they go after it");
                }
            }
            if enter_disabling {
                record_transition(client, state, ClientState::Disabling, json!({}), ctx).await?;
            }
            // DISABLING's Event is posted while the ranges are given back.
            let announced = async {
                if enter_disabling {
                    let note = "disconnect requested";
                    announce_transition(client, state, ClientState::Disabling, note, ctx).await;
                }
            };
            let ((), released) = futures::join!(announced, release(client, ctx));
            released?;
            let generation = transition(
                client,
                ClientState::Disabling,
                ClientState::Waiting,
                json!({"providerConfig": null}),
                "disconnected; its ranges were released",
                ctx,
            )
            .await?;
            Ok(Connected::not(generation))
        }
        Connection::Connect { enter_enabling } => {
            connect(client, state, enter_enabling, ctx, now).await
        }
    }
}

/// Connects: the routed range, the tunnel address, then the published configuration.
async fn connect(
    client: &GefyraClient,
    mut state: ClientState,
    enter_enabling: bool,
    ctx: &Context,
    now: Timestamp,
) -> Result<Connected> {
    let name = client.name_any();
    // Present whenever a connect is decided; an absent one would ask for nothing special.
    let parameter = client.provider_parameter.clone().unwrap_or_default();
    let request =
        ProviderParameter::parse(&parameter).map_err(|error| Error::InvalidParameter {
            client: name.clone(),
            message: error.to_string(),
        })?;
    let uid = client.uid().unwrap_or_default();
    if let Some(key) = request.public_key
        && let Some(other) = ctx.key_holder(client, key)
    {
        // The client learns only that its key is taken; the admin learns by whom.
        warn!(client = %name, holder = %other, "a connect was refused: its public key is the key of another ACTIVE client");
        tell_the_other_client(
            ctx,
            client,
            &other,
            "PublicKeyRefusedToAnother",
            format!("client {name} asked to connect with this client's public key and was refused"),
        )
        .await;
        return Err(Error::DuplicatePublicKey {
            client: name.clone(),
        });
    }
    // From WAITING the client enters ENABLING; a retry from ERROR goes straight to ACTIVE
    // once it succeeds, so a client that cannot connect stays in ERROR (no flapping).
    let before = state;
    if enter_enabling {
        record_transition(client, state, ClientState::Enabling, json!({}), ctx).await?;
        state = ClientState::Enabling;
    }
    // ENABLING's Event is posted while the range and address are recorded (one round trip
    // less per connect); ACTIVE's comes after both.
    let announced = async {
        if enter_enabling {
            let note = "connect requested";
            announce_transition(client, before, ClientState::Enabling, note, ctx).await;
        }
    };
    let ((), held) = futures::join!(announced, record_range_and_address(client, &request, ctx));
    let held = held?;
    let allocation = Allocation {
        uid,
        tunnel: held.address.into(),
        routed: request.subnet,
    };

    let mut generation = None;
    let stored = client
        .provider_config
        .as_ref()
        .and_then(|config| ProviderConfig::parse(config).ok());
    let current = state == ClientState::Active
        && connection::config_matches(stored.as_ref(), &allocation, request.public_key);
    if !current {
        let server = ctx.server_key().await?;
        let server_public: WireGuardKey =
            server
                .public
                .parse()
                .map_err(|problem| Error::InvalidServerKey {
                    problem: format!("publicKey {problem}"),
                })?;
        let (client_public, client_private) = match request.public_key {
            Some(public) => (public, None),
            None => {
                let pair = connection::generate_key_pair();
                let key = |text: &str| text.parse::<WireGuardKey>().expect("a generated key");
                (key(&pair.public), Some(key(&pair.private)))
            }
        };
        let config = ProviderConfig {
            // What a split tunnel routes (Gefyra's clients do not read it).
            cluster_ranges: cluster_ranges(&ctx.settings.pool),
            ..connection::new_config(
                &allocation,
                client_public,
                client_private,
                server_public,
                &ctx.settings.wireguard_endpoint,
            )
        };
        // Replace the whole map: keys of an older config are removed.
        let mut replacement = serde_json::Map::new();
        for stale in client.provider_config.iter().flat_map(|old| old.keys()) {
            replacement.insert(stale.clone(), serde_json::Value::Null);
        }
        replacement.extend(config.to_map());
        let routed = allocation
            .routed
            .map(|routed| format!(", routing {routed}"))
            .unwrap_or_default();
        generation = transition(
            client,
            state,
            ClientState::Active,
            json!({ "providerConfig": replacement }),
            &format!(
                "connected with tunnel address {}{routed}",
                allocation.tunnel.addr()
            ),
            ctx,
        )
        .await?;
    }

    // The connection's age counts from the tunnel-address claim, which the API server
    // stamped: nothing a client writes (stateTransitions) can extend it.
    let due = connection::connection_due(
        client.max_connection_age,
        ctx.settings.max_connection_age,
        held.since,
    )
    .map_err(|message| Error::InvalidConnectionAge {
        client: name.clone(),
        message,
    })?;
    if let Some(due) = due
        && due <= now
    {
        let patch = json!({ "providerParameter": null });
        ctx.patch_client(client, false, patch, |source| Error::RecordConnection {
            client: name.clone(),
            source,
        })
        .await?;
        ctx.event(
            client,
            EventType::Normal,
            "MaxConnectionAge",
            "Disconnect",
            format!(
                "connected since {}: maxConnectionAge reached; disconnecting",
                held.since
            ),
        )
        .await;
        return Ok(Connected::not(None));
    }
    Ok(Connected {
        due,
        connected: true,
        generation,
    })
}

/// The routed range first (compare-and-swap over every route), then the tunnel address (a
/// claim by unique name): both recorded in the API server before any configuration is
/// published.
async fn record_range_and_address(
    client: &GefyraClient,
    request: &ProviderParameter,
    ctx: &Context,
) -> Result<crate::allocator::Held> {
    let name = client.name_any();
    let uid = client.uid().unwrap_or_default();
    let pool = &ctx.settings.pool;
    let routed = match request.subnet {
        Some(subnet) => match ctx.routes.set_route(pool, &name, &uid, subnet).await? {
            Ok(()) => Ok(()),
            Err(Refused::Range(refused)) => Err(refused),
            Err(refused @ Refused::TooOften { retry_in, .. }) => {
                return Err(Error::RouteChangesTooOften {
                    client: name.clone(),
                    message: refused.to_string(),
                    retry_in,
                });
            }
        },
        None => ctx.routes.remove_route(&name).await.map(Ok)?,
    };
    let ipam_error = |source: IpamError| match source {
        IpamError::PoolExhausted { .. } => Error::PoolExhausted {
            client: name.clone(),
            source,
        },
        IpamError::Overlap { .. } => Error::SubnetConflict {
            client: name.clone(),
            source,
        },
        IpamError::NotNetworkAddress { .. }
        | IpamError::TooWide { .. }
        | IpamError::WrongFamily { .. } => Error::InvalidParameter {
            client: name.clone(),
            message: format!("providerParameter.{source}"),
        },
    };
    if let Err(IpamError::Overlap { subnet, occupant }) = &routed
        && let Some((other, other_subnet)) = occupant.other_client()
    {
        // The refusal the client reads names no one; the admin learns whose range it was.
        warn!(client = %name, %subnet, holder = %other, holder_subnet = %other_subnet, "a connect was refused: its subnet overlaps another client's range");
        tell_the_other_client(
            ctx,
            client,
            other,
            "SubnetRefusedToAnother",
            format!("client {name} asked for subnet {subnet}, which overlaps this client's range {other_subnet}, and was refused"),
        )
        .await;
    }
    routed.map_err(ipam_error)?;
    let held = ctx
        .claims
        .claim_tunnel(pool, client)
        .await
        .map_err(|source| match source {
            ClaimError::Ipam(source) => ipam_error(source),
            source => Error::TunnelClaim {
                client: name.clone(),
                source,
            },
        })?;
    ctx.observe_pool();
    Ok(held)
}

/// A Warning Event on client `other` (if the cache has it) about what `client` was refused
/// because of it: the admin reads who collided with whom there, never the refused client.
async fn tell_the_other_client(
    ctx: &Context,
    client: &GefyraClient,
    other: &str,
    reason: &str,
    note: String,
) {
    let Some(store) = ctx.clients.get() else {
        return;
    };
    let reference = kube::runtime::reflector::ObjectRef::new(other)
        .within(&client.namespace().unwrap_or_default());
    if let Some(other) = store.get(&reference) {
        ctx.event(&other, EventType::Warning, reason, "Reconcile", note)
            .await;
    }
}

/// Gives back everything `client` holds: its routed range and its tunnel-address claims.
pub async fn release(client: &GefyraClient, ctx: &Context) -> Result<()> {
    let name = client.name_any();
    ctx.routes.remove_route(&name).await?;
    let recorded = client
        .provider_config
        .as_ref()
        .and_then(|config| ProviderConfig::parse(config).ok())
        .map(|config| config.address);
    ctx.claims
        .release(&client.uid().unwrap_or_default(), recorded)
        .await
        .map_err(|source| Error::TunnelClaim {
            client: name.clone(),
            source,
        })?;
    ctx.observe_pool();
    Ok(())
}
