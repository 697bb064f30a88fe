//! Bridging: the operator's second controller, for GefyraBridgeMounts ([`mount`]) and
//! GefyraBridges ([`bridge`]) in its namespace, in Gefyra's wire layout and states.
//!
//! Every state change goes through [`Bridging::enter`] (a merge patch of `state`,
//! `stateTransitions` and the reason in `status`, then an Event); a failure lands the same way
//! in ERROR (or MISSING) with its reason, an Event and the log. Which client may mount or
//! bridge where is decided by the API server (the admission policies of
//! `gefyra_api::admission` and, for a bridge's client, a LocalSubjectAccessReview in the
//! mount's namespace), never by this process.

pub mod bridge;
pub mod mount;
pub mod router;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use gefyra_api::GefyraClient;
use gefyra_api::bridge::{CLIENT_LABEL, MOUNT_LABEL};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Service;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Api, Resource, ResourceExt};
use tracing::warn;

use crate::context::Context;
use crate::lifecycle::gefyra_time;

/// What the operator is told about bridging on its command line.
#[derive(Clone, Debug)]
pub struct BridgingSettings {
    /// The image the routers run (`gefyra-carrier` in it): the operator's own.
    pub carrier_image: String,
    /// Stowaway's Service for the routers' connections (in the operator's namespace).
    pub stowaway_service: String,
    pub stowaway_port: u16,
    /// Release a bridge when its client's last WireGuard handshake is older than this.
    pub idle_timeout: Option<SignedDuration>,
}

pub fn bridge_resource() -> ApiResource {
    resource(
        gefyra_api::bridge::BRIDGE_KIND,
        gefyra_api::bridge::BRIDGE_PLURAL,
    )
}

pub fn mount_resource() -> ApiResource {
    resource(
        gefyra_api::bridge::BRIDGE_MOUNT_KIND,
        gefyra_api::bridge::BRIDGE_MOUNT_PLURAL,
    )
}

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(gefyra_api::client::GROUP, gefyra_api::client::VERSION, kind),
        plural,
    )
}

/// Why a reconcile did not get through.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The object cannot work as written or as things are: state ERROR with `reason`.
    #[error("{reason}: {message}")]
    Error {
        reason: &'static str,
        message: String,
    },
    /// The mount's target does not exist (yet): state MISSING.
    #[error("TargetNotFound: {message}")]
    Missing { message: String },
    /// A request failed: retried, the state kept.
    #[error("{category}: {message}")]
    Transient {
        category: &'static str,
        message: String,
    },
}

impl Failure {
    pub fn error(reason: &'static str, message: impl Into<String>) -> Self {
        Failure::Error {
            reason,
            message: message.into(),
        }
    }

    pub fn missing(message: String) -> Self {
        Failure::Missing { message }
    }

    pub fn transient(category: &'static str, message: String) -> Self {
        Failure::Transient { category, message }
    }
}

/// Shared by both reconciles.
pub struct Bridging {
    pub ctx: Arc<Context>,
    pub settings: BridgingSettings,
    /// The bridges controller's cache (set once it runs).
    bridges: OnceLock<Store<DynamicObject>>,
}

impl Bridging {
    /// Stowaway's bridge port as the routers reach it: its Service's cluster IP (so that a
    /// router resolves nothing per connection).
    pub async fn stowaway_address(&self) -> Result<String, Failure> {
        let services: Api<Service> =
            Api::namespaced(self.ctx.client.clone(), &self.ctx.settings.namespace);
        let service = services
            .get(&self.settings.stowaway_service)
            .await
            .map_err(|error| {
                Failure::transient(
                    "ReadStowaway",
                    format!(
                        "reading Service {} (Stowaway's bridge port) failed: {error}",
                        self.settings.stowaway_service
                    ),
                )
            })?;
        let ip = service
            .spec
            .and_then(|spec| spec.cluster_ip)
            .filter(|ip| !ip.is_empty() && ip != "None")
            .ok_or_else(|| {
                Failure::transient(
                    "ReadStowaway",
                    format!(
                        "Service {} has no cluster IP",
                        self.settings.stowaway_service
                    ),
                )
            })?;
        Ok(format!("{ip}:{}", self.settings.stowaway_port))
    }

    /// Stowaway's bridge port by name (what a bridge's `clusterEndpoint` shows).
    pub fn stowaway_name(&self) -> String {
        format!(
            "{}.{}.svc:{}",
            self.settings.stowaway_service,
            self.ctx.settings.namespace,
            self.settings.stowaway_port
        )
    }

    /// Merge-patches `object`.
    pub async fn patch(
        &self,
        object: &DynamicObject,
        kind: &ApiResource,
        patch: serde_json::Value,
    ) -> Result<(), Failure> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.ctx.client.clone(), &self.ctx.settings.namespace, kind);
        api.patch(
            &object.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map(|_| ())
        .map_err(|error| {
            Failure::transient(
                "RecordState",
                format!(
                    "writing {} {} failed: {error}",
                    kind.kind,
                    object.name_any()
                ),
            )
        })
    }

    /// The one path of every state change: `state` entered (having passed `passed`) with
    /// `reason` and `message` in `status`, then an Event of `type_` with that reason.
    #[allow(clippy::too_many_arguments)]
    pub async fn enter(
        &self,
        object: &DynamicObject,
        kind: &ApiResource,
        state: &str,
        passed: &[&str],
        reason: &str,
        message: String,
        type_: EventType,
    ) -> Result<(), Failure> {
        let now = gefyra_time(Timestamp::now());
        self.patch(
            object,
            kind,
            gefyra_api::bridge::enter(state, passed, &now, reason, &message),
        )
        .await?;
        let action = format!("Enter{}{}", &state[..1], state[1..].to_ascii_lowercase());
        self.event(object, kind, type_, reason, &action, message)
            .await;
        Ok(())
    }

    /// Posts an Event about `object` (best effort: a failure is logged).
    pub async fn event(
        &self,
        object: &DynamicObject,
        kind: &ApiResource,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        event(&self.ctx, object, kind, type_, reason, action, note).await;
    }

    /// A failure in the object (ERROR or MISSING with its reason, unless already there with
    /// the same reason), an Event and the log; the retry delay.
    async fn record(
        &self,
        object: &DynamicObject,
        kind: &ApiResource,
        failure: &Failure,
    ) -> Duration {
        let state = object.data.get("state").and_then(|s| s.as_str());
        let recorded_reason = object
            .data
            .pointer("/status/reason")
            .and_then(|s| s.as_str());
        let (to, reason, message) = match failure {
            Failure::Transient { category, message } => {
                warn!(kind = %kind.kind, name = %object.name_any(), category, %message, "reconcile failed; retrying");
                return Duration::from_secs(2);
            }
            Failure::Error { reason, message } => ("ERROR", *reason, message),
            Failure::Missing { message } => ("MISSING", "TargetNotFound", message),
        };
        warn!(kind = %kind.kind, name = %object.name_any(), state = to, reason, %message, "{} {}: {to}", kind.kind, object.name_any());
        if state != Some(to) || recorded_reason != Some(reason) {
            // Deleting: the state stays RESTORING; the reason is still recorded.
            let entering = if object.metadata.deletion_timestamp.is_some() {
                state.unwrap_or("RESTORING")
            } else {
                to
            };
            if let Err(error) = self
                .enter(
                    object,
                    kind,
                    entering,
                    &[],
                    reason,
                    message.clone(),
                    EventType::Warning,
                )
                .await
            {
                warn!(%error, "could not record the failure");
            }
        }
        if to == "MISSING" {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(30)
        }
    }
}

/// Runs both controllers until the process ends.
pub async fn run(ctx: Arc<Context>, settings: BridgingSettings) {
    let bridging = Arc::new(Bridging {
        ctx: ctx.clone(),
        settings,
        bridges: OnceLock::new(),
    });
    let namespace = ctx.settings.namespace.clone();
    let mounts_api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &namespace, &mount_resource());
    let bridges_api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &namespace, &bridge_resource());
    let clients_api: Api<GefyraClient> = Api::namespaced(ctx.client.clone(), &namespace);

    let mounts = Controller::new_with(
        mounts_api.clone(),
        watcher::Config::default().any_semantic(),
        mount_resource(),
    )
    .run(
        |mount, bridging: Arc<Bridging>| async move {
            let kind = mount_resource();
            match mount::reconcile(mount.clone(), bridging.clone()).await {
                Ok(action) => Ok(action),
                Err(failure) => {
                    let retry = bridging.record(&mount, &kind, &failure).await;
                    Err(Retry(retry, failure))
                }
            }
        },
        |_, retry: &Retry, _| Action::requeue(retry.0),
        bridging.clone(),
    )
    .for_each(|_| async {});

    let bridges = Controller::new_with(
        bridges_api,
        watcher::Config::default().any_semantic(),
        bridge_resource(),
    );
    let _ = bridging.bridges.set(bridges.store());
    let store = bridges.store();
    let mounts_changed = bridges_labelled(store.clone(), MOUNT_LABEL);
    let clients_changed = bridges_labelled(store, CLIENT_LABEL);
    // A client's own changes (state, parameters: its generation), not Stowaway's status
    // writes; an idle laptop is found by each ACTIVE bridge's periodic check.
    let clients = watcher(clients_api, watcher::Config::default().any_semantic())
        .default_backoff()
        .touched_objects()
        .predicate_filter(predicates::generation, PredicateConfig::default());
    let bridges = bridges
        .watches_with(
            mounts_api,
            mount_resource(),
            watcher::Config::default().any_semantic(),
            mounts_changed,
        )
        .watches_stream(clients, clients_changed)
        .run(
            |bridge, bridging: Arc<Bridging>| async move {
                let kind = bridge_resource();
                match bridge::reconcile(bridge.clone(), bridging.clone()).await {
                    Ok(action) => Ok(action),
                    Err(failure) => {
                        let retry = bridging.record(&bridge, &kind, &failure).await;
                        Err(Retry(retry, failure))
                    }
                }
            },
            |_, retry: &Retry, _| Action::requeue(retry.0),
            bridging.clone(),
        )
        .for_each(|_| async {});
    tokio::join!(mounts, bridges);
}

/// A watch mapper: the bridges whose `label` names the changed object (a mount or a client).
fn bridges_labelled<K: ResourceExt>(
    store: Store<DynamicObject>,
    label: &'static str,
) -> impl Fn(K) -> Vec<ObjectRef<DynamicObject>> {
    move |object: K| {
        let name = object.name_any();
        store
            .state()
            .into_iter()
            .filter(|bridge| bridge.labels().get(label) == Some(&name))
            .map(|bridge| {
                ObjectRef::new_with(&bridge.name_any(), bridge_resource())
                    .within(&bridge.namespace().unwrap_or_default())
            })
            .collect()
    }
}

/// A failure recorded, with the delay before the next try.
#[derive(Debug, thiserror::Error)]
#[error("{1}")]
struct Retry(Duration, Failure);

/// An Event on a bridge or mount (a failure to publish is logged, never fatal).
pub async fn event(
    ctx: &Context,
    object: &DynamicObject,
    kind: &ApiResource,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &object.object_ref(kind)).await {
        warn!(kind = %kind.kind, name = %object.name_any(), %error, "could not publish event {reason}");
    }
}
