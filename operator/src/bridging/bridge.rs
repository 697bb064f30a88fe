//! A GefyraBridge's reconcile: checked (labels, port mappings, rules, its client connected and
//! `destinationIP` in the client's own ranges, its mount ACTIVE and routing its ports, the
//! client granted bridging in the mount's namespace, no older rule-less bridge on its ports),
//! then ACTIVE (passing Gefyra's INSTALLING, INSTALLED, CREATING; Event `Ready`, which
//! Gefyra's CLI waits for). Only ACTIVE bridges are routed, by the router and by Stowaway.
//!
//! A bridge whose laptop vanished goes away and its traffic returns to the original: its
//! client deleted or disconnected (after the bridge was ACTIVE), its sunset passed, or no
//! WireGuard handshake for the idle timeout.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use gefyra_api::bridge::{BridgeFields, CLIENT_LABEL, GRANT_VERB, MOUNT_LABEL};
use gefyra_api::bridge_rules::{self, Rules};
use gefyra_api::connection::ProviderConfig;
use gefyra_api::{ClientState, GefyraClient};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::authorization::v1::{
    LocalSubjectAccessReview, ResourceAttributes, SubjectAccessReviewSpec,
};
use kube::api::{DeleteParams, DynamicObject, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::info;

use super::{Bridging, Failure, bridge_resource, mount_resource};

/// How long a bridge stays CREATING (served by Stowaway) before it is ACTIVE (routed to by
/// the routers): the lag between two watches, with room.
const STOWAWAY_FIRST: Duration = Duration::from_secs(1);
use crate::context::Context;

/// How often an ACTIVE bridge is looked at again without a change (grant revoked, laptop idle).
const RECHECK: Duration = Duration::from_secs(30);

fn bridge_fields(bridge: &DynamicObject) -> BridgeFields {
    serde_json::from_value(bridge.data.clone()).unwrap_or_default()
}

fn was_active(bridge: &DynamicObject) -> bool {
    bridge.data.pointer("/stateTransitions/ACTIVE").is_some()
}

/// Why a vanished laptop's bridge goes, if it does.
pub fn vanished(
    client: Option<&GefyraClient>,
    bridge_was_active: bool,
    bridge_sunset: Option<&str>,
    idle_timeout: Option<SignedDuration>,
    now: Timestamp,
) -> Option<String> {
    let Some(client) = client else {
        return Some("its client was deleted".into());
    };
    if let Some(sunset) = bridge_sunset.and_then(|s| s.parse::<Timestamp>().ok())
        && sunset <= now
    {
        return Some(format!("its sunset {sunset} passed"));
    }
    if client.state != ClientState::Active {
        return bridge_was_active
            .then(|| format!("its client disconnected (state {})", client.state));
    }
    let idle = idle_timeout?;
    let handshake = client
        .status
        .as_ref()
        .and_then(|status| status.wireguard.as_ref())
        .and_then(|wireguard| wireguard.get("latest_handshake"))
        .and_then(|at| at.as_str())
        .and_then(|at| at.parse::<Timestamp>().ok());
    let connected = client
        .state_transitions
        .get("ACTIVE")
        .and_then(|at| at.parse::<Timestamp>().ok());
    let last_sign = handshake.into_iter().chain(connected).max()?;
    (now.duration_since(last_sign) > idle).then(|| {
        format!(
            "its client's last WireGuard handshake was at {last_sign}, longer ago than the idle timeout ({}s)",
            idle.as_secs()
        )
    })
}

/// The client's own ranges: its tunnel address and its routed subnet.
fn client_holds(client: &GefyraClient, address: IpAddr) -> bool {
    let tunnel = client
        .provider_config
        .as_ref()
        .and_then(|config| ProviderConfig::parse(config).ok())
        .map(|config| config.address);
    // The subnet is the client's own writing: it counts once the operator accepted it (the
    // client's Ready condition true for its current generation), as the admission policy
    // gefyra-bridge-destinations-<ns> reads it.
    let accepted = client.ready_condition().is_some_and(|ready| {
        ready.status == "True" && ready.observed_generation == client.metadata.generation
    });
    let subnet = client
        .provider_parameter
        .as_ref()
        .filter(|_| accepted)
        .and_then(|parameter| parameter.get("subnet"))
        .and_then(|subnet| subnet.as_str())
        .and_then(|subnet| subnet.parse::<ipnet::IpNet>().ok());
    tunnel == Some(address) || subnet.is_some_and(|subnet| subnet.contains(&address))
}

pub(super) async fn reconcile(
    bridge: Arc<DynamicObject>,
    bridging: Arc<Bridging>,
) -> Result<Action, Failure> {
    if bridge.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let name = bridge.name_any();
    let fields = bridge_fields(&bridge);
    let namespace = &bridging.ctx.settings.namespace;
    let labels = bridge.labels();
    if labels.get(CLIENT_LABEL) != Some(&fields.client)
        || labels.get(MOUNT_LABEL) != Some(&fields.target)
    {
        return Err(Failure::error(
            "LabelMismatch",
            format!(
                "the labels {CLIENT_LABEL} and {MOUNT_LABEL} must equal client ({}) and target ({}): the router finds a mount's bridges by them",
                fields.client, fields.target
            ),
        ));
    }
    let mappings = bridge_rules::port_mappings(&fields.port_mappings)
        .map_err(|error| Failure::error("InvalidPortMappings", error.to_string()))?;
    let rules = Rules::compile(fields.provider_parameter.as_ref())
        .map_err(|error| Failure::error("InvalidRules", error.to_string()))?;

    // The client: present, connected, alive; destinationIP its own. Absent from a cache
    // not yet filled is not deleted.
    let store = bridging
        .ctx
        .clients
        .get()
        .filter(|store| {
            futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
        })
        .ok_or_else(|| {
            Failure::transient(
                "ReadClients",
                "the cache of clients is not filled yet".into(),
            )
        })?;
    let client = store.get(&ObjectRef::<GefyraClient>::new(&fields.client).within(namespace));
    let now = Timestamp::now();
    if let Some(why) = vanished(
        client.as_deref(),
        was_active(&bridge),
        fields.sunset.as_deref(),
        bridging.settings.idle_timeout,
        now,
    ) {
        release(&bridge, &bridging, &why).await?;
        return Ok(Action::await_change());
    }
    let Some(client) = client.filter(|client| client.state == ClientState::Active) else {
        return Err(Failure::error(
            "ClientNotConnected",
            format!(
                "client {} is not connected: connect first (kubectl gefyra connect, or gefyra connections connect), then bridge",
                fields.client
            ),
        ));
    };
    let destination: IpAddr = fields.destination_ip.parse().map_err(|_| {
        Failure::error(
            "DestinationNotAllowed",
            format!(
                "destinationIP {:?} is not an IP address",
                fields.destination_ip
            ),
        )
    })?;
    if !client_holds(&client, destination) {
        return Err(Failure::error(
            "DestinationNotAllowed",
            format!(
                "destinationIP {destination} is neither client {}'s tunnel address nor in its routed subnet: a bridge reaches only its own client",
                fields.client
            ),
        ));
    }

    // The mount: ACTIVE, routing the bridge's ports.
    let mounts: Api<DynamicObject> =
        Api::namespaced_with(bridging.ctx.client.clone(), namespace, &mount_resource());
    let mount = match mounts.get_opt(&fields.target).await {
        Ok(Some(mount)) => mount,
        Ok(None) => {
            return Err(Failure::error(
                "MountNotFound",
                format!(
                    "GefyraBridgeMount {} does not exist: an admin creates it (kubectl gefyra mount create)",
                    fields.target
                ),
            ));
        }
        Err(error) => {
            return Err(Failure::transient(
                "ReadMount",
                format!(
                    "reading GefyraBridgeMount {} failed: {error}",
                    fields.target
                ),
            ));
        }
    };
    let mount_state = mount
        .data
        .get("state")
        .and_then(|s| s.as_str())
        .unwrap_or("REQUESTED");
    if mount_state != "ACTIVE" {
        if fields.state.as_deref().unwrap_or("REQUESTED") != "INSTALLING" {
            bridging
                .enter(
                    &bridge,
                    &bridge_resource(),
                    "INSTALLING",
                    &[],
                    "WaitingForMount",
                    format!(
                        "waiting for GefyraBridgeMount {} to be ACTIVE (it is {mount_state})",
                        fields.target
                    ),
                    EventType::Normal,
                )
                .await?;
        }
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    let routed = super::mount::routed_ports(&mount);
    if let Some(unrouted) = mappings.iter().find(|m| !routed.contains(&m.remote)) {
        return Err(Failure::error(
            "PortNotRouted",
            format!(
                "container port {} is not behind a Service of the mounted workload: its router listens on {}",
                unrouted.remote,
                routed
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let target_namespace = mount
        .data
        .get("targetNamespace")
        .and_then(|s| s.as_str())
        .unwrap_or_default()
        .to_string();

    // One rule-less bridge per port: the oldest keeps it.
    if rules.is_empty()
        && let Some(store) = bridging.bridges.get()
    {
        let key = |b: &DynamicObject| (b.creation_timestamp().map(|t| t.0), b.name_any());
        let mine = key(&bridge);
        let older = store.state().into_iter().find(|other| {
            let other_fields = bridge_fields(other);
            other.name_any() != name
                && other_fields.target == fields.target
                && other_fields.state.as_deref() == Some("ACTIVE")
                && key(other) < mine
                && Rules::compile(other_fields.provider_parameter.as_ref())
                    .is_ok_and(|r| r.is_empty())
                && bridge_rules::port_mappings(&other_fields.port_mappings).is_ok_and(|theirs| {
                    theirs
                        .iter()
                        .any(|t| mappings.iter().any(|m| m.remote == t.remote))
                })
        });
        if let Some(older) = older {
            return Err(Failure::error(
                "PortTaken",
                format!(
                    "bridge {} already takes all traffic of a port of mount {} (it has no rules): add a header or path rule, or ask its owner to delete it",
                    older.name_any(),
                    fields.target
                ),
            ));
        }
    }

    // The grant, asked of the API server for the client's own identity.
    if !granted(&bridging, &fields.client, &target_namespace).await? {
        return Err(Failure::error(
            "NotGranted",
            format!(
                "client {} may not bridge in namespace {target_namespace}: an admin grants it with a RoleBinding of ClusterRole {} there to ServiceAccount {}/{}",
                fields.client,
                gefyra_api::bridge::GRANT_CLUSTER_ROLE,
                namespace,
                GefyraClient::service_account_name_for(&fields.client)
            ),
        ));
    }

    // CREATING first, ACTIVE a moment later: Stowaway serves a bridge from CREATING on,
    // routers send to it from ACTIVE on; each follows the bridges by its own watch, and so
    // Stowaway is ready before the first connection comes.
    match fields.state.as_deref() {
        Some("ACTIVE") => {}
        Some("CREATING") => {
            let since = bridge
                .data
                .pointer("/stateTransitions/CREATING")
                .and_then(|at| at.as_str())
                .and_then(|at| at.parse::<Timestamp>().ok());
            let waited = since
                .map(|since| now.duration_since(since))
                .unwrap_or(SignedDuration::MAX);
            let grace = SignedDuration::try_from(STOWAWAY_FIRST).unwrap_or(SignedDuration::MAX);
            if waited < grace {
                let left = (grace - waited)
                    .try_into()
                    .unwrap_or(STOWAWAY_FIRST)
                    .max(Duration::from_millis(50));
                return Ok(Action::requeue(left));
            }
            let routes = mappings
                .iter()
                .map(|m| format!("{} → {destination}:{}", m.remote, m.local))
                .collect::<Vec<_>>()
                .join(", ");
            let what = if rules.is_empty() {
                "all traffic"
            } else {
                "requests matching its rules"
            };
            bridging
                .enter(
                    &bridge,
                    &bridge_resource(),
                    "ACTIVE",
                    &[],
                    "Ready",
                    format!(
                        "{what} of mount {} (ports {routes}) go to client {}",
                        fields.target, fields.client
                    ),
                    EventType::Normal,
                )
                .await?;
            info!(bridge = %name, client = %fields.client, mount = %fields.target, "bridge ACTIVE");
        }
        _ => {
            let endpoint = json!({"clusterEndpoint": {"stowaway": bridging.stowaway_name()}});
            bridging
                .patch(&bridge, &bridge_resource(), endpoint)
                .await?;
            bridging
                .enter(
                    &bridge,
                    &bridge_resource(),
                    "CREATING",
                    &["INSTALLING", "INSTALLED"],
                    "Creating",
                    format!(
                        "Stowaway serves the bridge to client {}; the router sends to it in a moment",
                        fields.client
                    ),
                    EventType::Normal,
                )
                .await?;
            return Ok(Action::requeue(STOWAWAY_FIRST));
        }
    }
    Ok(Action::requeue(next_check(&fields, now)))
}

/// When to look again: the recheck period (a revoked grant, an idle laptop), or earlier when
/// the bridge's sunset falls.
fn next_check(fields: &BridgeFields, now: Timestamp) -> Duration {
    let sunset = fields
        .sunset
        .as_deref()
        .and_then(|s| s.parse::<Timestamp>().ok())
        .and_then(|sunset| Duration::try_from(sunset.duration_since(now)).ok());
    sunset
        .map_or(RECHECK, |until| until.min(RECHECK))
        .max(Duration::from_millis(200))
}

/// Whether `client`'s identity holds the bridging grant in `namespace`.
async fn granted(bridging: &Bridging, client: &str, namespace: &str) -> Result<bool, Failure> {
    let review = LocalSubjectAccessReview {
        metadata: kube::api::ObjectMeta {
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        spec: SubjectAccessReviewSpec {
            user: Some(format!(
                "system:serviceaccount:{}:{}",
                bridging.ctx.settings.namespace,
                GefyraClient::service_account_name_for(client)
            )),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{}", bridging.ctx.settings.namespace),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                group: Some(gefyra_api::client::GROUP.into()),
                resource: Some(gefyra_api::bridge::BRIDGE_PLURAL.into()),
                verb: Some(GRANT_VERB.into()),
                namespace: Some(namespace.to_string()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        status: None,
    };
    let api: Api<LocalSubjectAccessReview> =
        Api::namespaced(bridging.ctx.client.clone(), namespace);
    let answer = api.create(&PostParams::default(), &review).await.map_err(|error| match error {
        kube::Error::Api(status) if status.code == 403 => Failure::error(
            "NotPermitted",
            format!("the operator may not review access in namespace {namespace}: bridging is not enabled there (the chart's bridging.namespaces, or bridging.clusterWide)"),
        ),
        other => Failure::transient("ReviewAccess", format!("asking the API server whether the client may bridge in {namespace} failed: {other}")),
    })?;
    Ok(answer.status.is_some_and(|status| status.allowed))
}

/// A vanished laptop's bridge: a Warning Event saying why, then the bridge deleted; the
/// router and Stowaway stop routing it at once.
async fn release(bridge: &DynamicObject, bridging: &Bridging, why: &str) -> Result<(), Failure> {
    release_bridge(&bridging.ctx, bridge, why)
        .await
        .map_err(|error| {
            Failure::transient(
                "ReleaseBridge",
                format!("deleting bridge {} failed: {error}", bridge.name_any()),
            )
        })
}

async fn release_bridge(
    ctx: &Context,
    bridge: &DynamicObject,
    why: &str,
) -> Result<(), kube::Error> {
    let name = bridge.name_any();
    let message =
        format!("bridge {name} released: {why}; its traffic goes to the original workload again");
    super::event(
        ctx,
        bridge,
        &bridge_resource(),
        EventType::Warning,
        "Released",
        "Release",
        message,
    )
    .await;
    info!(bridge = %name, %why, "bridge released");
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &ctx.settings.namespace,
        &bridge_resource(),
    );
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(error),
    }
}

/// A disconnecting client's bridges that were ACTIVE, released before its peer goes: the routers send new
/// connections to the original while the tunnel still carries what is in flight, instead
/// of to a tunnel that is closing. How many there were.
pub async fn release_bridges_of(
    ctx: &Context,
    client: &str,
    why: &str,
) -> Result<usize, kube::Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &ctx.settings.namespace,
        &bridge_resource(),
    );
    let bridges = api
        .list(&kube::api::ListParams::default().labels(&format!("{CLIENT_LABEL}={client}")))
        .await?;
    // As the vanished-laptop rule has it: a bridge goes with its client's connection once it
    // was ACTIVE; one that never was stays, in ERROR ClientNotConnected.
    let mut released = 0;
    for bridge in bridges.items.iter().filter(|bridge| was_active(bridge)) {
        release_bridge(ctx, bridge, why).await?;
        released += 1;
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(state: ClientState, handshake: Option<&str>, active_at: &str) -> GefyraClient {
        let mut client = GefyraClient::new("dev", "gefyra");
        client.state = state;
        client
            .state_transitions
            .insert("ACTIVE".into(), active_at.into());
        if let Some(at) = handshake {
            client.status = Some(
                serde_json::from_value(json!({"wireguard": {"latest_handshake": at}})).unwrap(),
            );
        }
        client
    }

    #[test]
    fn a_vanished_laptop_is_told_apart_from_a_quiet_one() {
        let now: Timestamp = "2026-12-07T12:00:00Z".parse().unwrap();
        let idle = Some(SignedDuration::from_mins(10));
        assert!(
            vanished(None, false, None, idle, now)
                .unwrap()
                .contains("deleted")
        );
        let fresh = client(
            ClientState::Active,
            Some("2026-12-07T11:58:00Z"),
            "2026-12-07T09:00:00Z",
        );
        assert_eq!(vanished(Some(&fresh), true, None, idle, now), None);
        let stale = client(
            ClientState::Active,
            Some("2026-12-07T11:00:00Z"),
            "2026-12-07T09:00:00Z",
        );
        assert!(
            vanished(Some(&stale), true, None, idle, now)
                .unwrap()
                .contains("handshake")
        );
        assert_eq!(
            vanished(Some(&stale), true, None, None, now),
            None,
            "no idle timeout"
        );
        let just_connected = client(ClientState::Active, None, "2026-12-07T11:59:00Z");
        assert_eq!(vanished(Some(&just_connected), true, None, idle, now), None);
        let gone = client(ClientState::Waiting, None, "2026-12-07T11:59:00Z");
        assert!(
            vanished(Some(&gone), true, None, idle, now)
                .unwrap()
                .contains("disconnected")
        );
        assert_eq!(
            vanished(Some(&gone), false, None, idle, now),
            None,
            "never ACTIVE: an ERROR, not a release"
        );
        assert!(
            vanished(Some(&fresh), true, Some("2026-12-07T11:59:59Z"), idle, now)
                .unwrap()
                .contains("sunset")
        );
    }

    #[test]
    fn a_bridge_reaches_only_its_own_clients_ranges() {
        let mut dev = GefyraClient::new("dev", "gefyra");
        dev.provider_parameter = Some(
            json!({"subnet": "172.30.0.0/24"})
                .as_object()
                .unwrap()
                .clone(),
        );
        assert!(
            !client_holds(&dev, "172.30.0.9".parse().unwrap()),
            "a subnet the operator has not accepted (no Ready condition) counts for nothing"
        );
        dev.metadata.generation = Some(3);
        dev.status = Some(
            serde_json::from_value(json!({"conditions": [{"type": "Ready", "status": "True",
                "reason": "Connected", "message": "", "observedGeneration": 3,
                "lastTransitionTime": "2026-12-07T12:00:00Z"}]}))
            .unwrap(),
        );
        assert!(client_holds(&dev, "172.30.0.9".parse().unwrap()));
        assert!(!client_holds(&dev, "172.31.0.9".parse().unwrap()));
        assert!(!client_holds(&dev, "10.96.0.1".parse().unwrap()));
        dev.metadata.generation = Some(4);
        assert!(
            !client_holds(&dev, "172.30.0.9".parse().unwrap()),
            "a subnet changed since the operator last looked counts for nothing"
        );
    }
}
