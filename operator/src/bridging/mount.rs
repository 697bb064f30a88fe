//! A GefyraBridgeMount's reconcile: REQUESTED → PREPARING (the target read, the Services
//! planned, the original-Pods Service and the router's identity in place) → INSTALLING (the
//! router Deployment, until Ready) → ACTIVE (the Services switched to the router; Event
//! `Ready`). Deleting it: RESTORING (the Services switched back, the router drained and
//! removed, the mount's bridges deleted), then the finalizer goes. The target's Pods are
//! never written.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use gefyra_api::bridge::{
    self, CARRIER_LABEL, MOUNT_LABEL, MountFields, WorkloadKind, original_service_name, router_name,
};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodTemplateSpec, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::router::{
    self, MOUNTED_BY_ANNOTATION, ORIGINAL_SELECTOR_ANNOTATION, Plan, RouterSettings, ServiceView,
    Workload,
};
use super::{Bridging, Failure, mount_resource};
use crate::context::FIELD_MANAGER;

pub const FINALIZER: &str = "gefyra.dev/bridge-mount";
/// The Role (shipped by the chart in the operator's namespace) a router's identity is bound
/// to: read the GefyraBridges.
pub const CARRIER_ROLE: &str = "gefyra-carrier";
/// How long a router keeps serving after its Services are switched back, so that every
/// node's proxy sends new connections to the original Pods before it goes.
const DRAIN: Duration = Duration::from_secs(3);
/// How long an unmount waits for the router's Pods to go before it retries.
const ROUTER_GONE_WITHIN: Duration = Duration::from_secs(60);

pub(super) async fn reconcile(
    mount: Arc<DynamicObject>,
    bridging: Arc<Bridging>,
) -> Result<Action, Failure> {
    let api: Api<DynamicObject> = Api::namespaced_with(
        bridging.ctx.client.clone(),
        &bridging.ctx.settings.namespace,
        &mount_resource(),
    );
    finalizer(&api, FINALIZER, mount, |event| async {
        match event {
            Finalizer::Apply(mount) => apply(&mount, &bridging).await,
            Finalizer::Cleanup(mount) => cleanup(&mount, &bridging).await,
        }
    })
    .await
    .map_err(|error| match error {
        kube::runtime::finalizer::Error::ApplyFailed(failure)
        | kube::runtime::finalizer::Error::CleanupFailed(failure) => failure,
        other => Failure::transient("Finalizer", other.to_string()),
    })
}

fn fields(mount: &DynamicObject) -> MountFields {
    serde_json::from_value(mount.data.clone()).unwrap_or_default()
}

/// The Pods' labels and selector, their named ports and containers, from the target.
async fn read_workload(
    bridging: &Bridging,
    namespace: &str,
    target: &str,
) -> Result<Workload, Failure> {
    let (kind, name) =
        bridge::workload(target).map_err(|problem| Failure::error("InvalidTarget", problem))?;
    let client = bridging.ctx.client.clone();
    let not_found = |error: kube::Error| match error {
        kube::Error::Api(status) if status.code == 404 => Failure::missing(format!(
            "{target} does not exist in namespace {namespace}: the mount waits for it"
        )),
        kube::Error::Api(status) if status.code == 403 => Failure::error(
            "NotPermitted",
            format!(
                "the operator may not read {target} in namespace {namespace}: bridging is not enabled there (the chart's bridging.namespaces, or bridging.clusterWide)"
            ),
        ),
        other => Failure::transient(
            "ReadTarget",
            format!("reading {target} in namespace {namespace} failed: {other}"),
        ),
    };
    // A Deployment's or StatefulSet's Pods: its selector and Pod template, one check for both.
    let from_template = |selector: LabelSelector, template: PodTemplateSpec| {
        if selector
            .match_expressions
            .as_ref()
            .is_some_and(|e| !e.is_empty())
        {
            return Err(Failure::error(
                "UnsupportedSelector",
                format!(
                    "{target} selects its Pods with matchExpressions: only matchLabels selectors can be mounted"
                ),
            ));
        }
        Ok((
            template.metadata.and_then(|m| m.labels),
            selector.match_labels,
            template.spec,
        ))
    };
    let (template_labels, selector, spec): (_, Option<BTreeMap<String, String>>, Option<PodSpec>) =
        match kind {
            WorkloadKind::Deployment => {
                let spec = Api::<Deployment>::namespaced(client, namespace)
                    .get(name)
                    .await
                    .map_err(not_found)?
                    .spec
                    .unwrap_or_default();
                from_template(spec.selector, spec.template)?
            }
            WorkloadKind::StatefulSet => {
                let spec = Api::<StatefulSet>::namespaced(client, namespace)
                    .get(name)
                    .await
                    .map_err(not_found)?
                    .spec
                    .unwrap_or_default();
                from_template(spec.selector, spec.template)?
            }
            WorkloadKind::Pod => {
                let pod = Api::<Pod>::namespaced(client, namespace)
                    .get(name)
                    .await
                    .map_err(not_found)?;
                let labels = pod.metadata.labels.clone();
                (labels.clone(), labels, pod.spec)
            }
        };
    let labels = template_labels.unwrap_or_default();
    let selector = selector.unwrap_or_default();
    if selector.is_empty() {
        return Err(Failure::error(
            "UnsupportedSelector",
            format!("{target} has no labels to select its Pods by"),
        ));
    }
    let spec = spec.unwrap_or_default();
    let mut named_ports = BTreeMap::new();
    for container in &spec.containers {
        for port in container.ports.iter().flatten() {
            if let Some(name) = &port.name {
                named_ports.insert(name.clone(), port.container_port);
            }
        }
    }
    Ok(Workload {
        labels,
        selector,
        named_ports,
        containers: spec.containers.iter().map(|c| c.name.clone()).collect(),
    })
}

fn service_view(service: &Service) -> ServiceView<'_> {
    let spec = service.spec.clone().unwrap_or_default();
    ServiceView {
        name: service.metadata.name.as_deref().unwrap_or_default(),
        selector: spec.selector.unwrap_or_default(),
        annotations: service.metadata.annotations.clone().unwrap_or_default(),
        headless: spec.cluster_ip.as_deref() == Some("None"),
        target_ports: spec
            .ports
            .iter()
            .flatten()
            .map(|p| p.target_port.clone())
            .collect(),
        ports: spec.ports.iter().flatten().map(|p| p.port).collect(),
    }
}

async fn apply(mount: &DynamicObject, bridging: &Bridging) -> Result<Action, Failure> {
    let name = mount.name_any();
    let fields = fields(mount);
    let namespace = fields.target_namespace.as_str();
    let state = fields.state.as_deref().unwrap_or("REQUESTED");
    if fields
        .provider_parameter
        .as_ref()
        .and_then(|p| p.as_object())
        .is_some_and(|p| !p.is_empty())
    {
        return Err(Failure::error(
            "TlsNotSupported",
            "providerParameter (TLS termination) is not supported: the router passes TLS through as TCP; create the mount without --tls-* options".to_string(),
        ));
    }
    let workload = read_workload(bridging, namespace, &fields.target).await?;
    if let Some(container) = fields.target_container.as_deref().filter(|c| !c.is_empty())
        && !workload.containers.iter().any(|c| c == container)
    {
        return Err(Failure::error(
            "ContainerNotFound",
            format!(
                "{} has no container {container} (it has: {})",
                fields.target,
                workload.containers.join(", ")
            ),
        ));
    }
    let services_api: Api<Service> = Api::namespaced(bridging.ctx.client.clone(), namespace);
    let services = services_api
        .list(&ListParams::default())
        .await
        .map_err(|error| {
            Failure::transient(
                "ListServices",
                format!("listing the Services of namespace {namespace} failed: {error}"),
            )
        })?;
    let views: Vec<ServiceView> = services.items.iter().map(service_view).collect();
    let plan = router::plan(&name, &workload, &views).map_err(|problem| match problem {
        router::PlanProblem::NoService => Failure::error("NoService", problem.to_string()),
        router::PlanProblem::MountedByAnother { .. } => {
            Failure::error("AlreadyMounted", problem.to_string())
        }
    })?;
    if state == "REQUESTED" || state == "ERROR" || state == "MISSING" {
        bridging
            .enter(
                mount,
                &mount_resource(),
                "PREPARING",
                &[],
                "Preparing",
                format!(
                    "putting a router in front of {} in namespace {namespace}",
                    fields.target
                ),
                EventType::Normal,
            )
            .await?;
    }
    let original_ip = prepare(mount, bridging, namespace, &workload, &plan).await?;
    let ports: Vec<u16> = plan.ports.iter().copied().collect();
    let deployment = router::router_deployment(
        &name,
        namespace,
        &workload,
        &plan.ports,
        &RouterSettings {
            image: &bridging.settings.carrier_image,
            bridges_namespace: &bridging.ctx.settings.namespace,
            stowaway: &bridging.stowaway_address().await?,
            original_ip: &original_ip,
        },
    );
    let deployments: Api<Deployment> = Api::namespaced(bridging.ctx.client.clone(), namespace);
    let applied = deployments
        .patch(
            &router_name(&name),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&deployment),
        )
        .await
        .map_err(|error| {
            permission_or_transient(error, "ApplyRouter", namespace, "the router Deployment")
        })?;
    let ready = applied.status.as_ref().is_some_and(|status| {
        status.observed_generation == applied.metadata.generation
            && status.available_replicas.unwrap_or(0) >= 1
            && status.updated_replicas.unwrap_or(0) >= 1
    });
    if !ready && state == "ACTIVE" {
        // The Services stay switched: a router replaced (rolled, rescheduled) is back soon.
        warn!(mount = %name, %namespace, "the router is not Ready; its Services stay switched");
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    if !ready {
        if state != "INSTALLING" {
            bridging
                .enter(
                    mount,
                    &mount_resource(),
                    "INSTALLING",
                    &["PREPARING"],
                    "Installing",
                    format!("waiting for the router {} to be Ready", router_name(&name)),
                    EventType::Normal,
                )
                .await?;
        }
        return Ok(Action::requeue(Duration::from_millis(300)));
    }
    switch(&services_api, &name, &plan).await?;
    if state != "ACTIVE" {
        let patch = json!({"status": {"ports": ports, "services": plan.services.iter().map(|(s, _)| s).collect::<Vec<_>>()}});
        bridging.patch(mount, &mount_resource(), patch).await?;
        bridging
            .enter(
                mount,
                &mount_resource(),
                "ACTIVE",
                &["PREPARING", "INSTALLING"],
                "Ready",
                format!(
                    "the router is in front of {} in namespace {namespace} (Services {}; ports {}); its Pods are untouched",
                    fields.target,
                    plan.services.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>().join(", "),
                    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
                ),
                EventType::Normal,
            )
            .await?;
        info!(mount = %name, %namespace, target = %fields.target, "mount ACTIVE");
    }
    Ok(Action::requeue(Duration::from_secs(60)))
}

fn permission_or_transient(
    error: kube::Error,
    category: &'static str,
    namespace: &str,
    what: &str,
) -> Failure {
    match error {
        kube::Error::Api(status) if status.code == 403 => Failure::error(
            "NotPermitted",
            format!(
                "the operator may not write {what} in namespace {namespace}: bridging is not enabled there (the chart's bridging.namespaces, or bridging.clusterWide)"
            ),
        ),
        other => Failure::transient(
            category,
            format!("writing {what} in namespace {namespace} failed: {other}"),
        ),
    }
}

/// The router's identity and the original-Pods Service; the latter's cluster IP.
async fn prepare(
    mount: &DynamicObject,
    bridging: &Bridging,
    namespace: &str,
    workload: &Workload,
    plan: &Plan,
) -> Result<String, Failure> {
    let name = mount.name_any();
    let client = bridging.ctx.client.clone();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let router = router_name(&name);
    let labels = BTreeMap::from([(MOUNT_LABEL.to_string(), name.clone())]);
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(router.clone()),
            namespace: Some(namespace.to_string()),
            labels: Some(labels.clone()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .patch(&router, &params, &Patch::Apply(&account))
        .await
        .map_err(|error| {
            permission_or_transient(
                error,
                "ApplyRouterIdentity",
                namespace,
                "the router's ServiceAccount",
            )
        })?;
    let own_namespace = &bridging.ctx.settings.namespace;
    let binding_name = carrier_binding_name(namespace, &name);
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some(binding_name.clone()),
            namespace: Some(own_namespace.clone()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: CARRIER_ROLE.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: router.clone(),
            namespace: Some(namespace.to_string()),
            ..Subject::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(client.clone(), own_namespace)
        .patch(&binding_name, &params, &Patch::Apply(&binding))
        .await
        .map_err(|error| {
            Failure::transient(
                "ApplyRouterIdentity",
                format!("binding Role {CARRIER_ROLE} to the router's identity failed: {error}"),
            )
        })?;
    let service = router::original_service(&name, namespace, workload, &plan.ports);
    let applied = Api::<Service>::namespaced(client, namespace)
        .patch(
            &original_service_name(&name),
            &params,
            &Patch::Apply(&service),
        )
        .await
        .map_err(|error| {
            permission_or_transient(
                error,
                "ApplyOriginalService",
                namespace,
                "the original-Pods Service",
            )
        })?;
    applied
        .spec
        .and_then(|spec| spec.cluster_ip)
        .filter(|ip| !ip.is_empty() && ip != "None")
        .ok_or_else(|| {
            Failure::transient(
                "ApplyOriginalService",
                "the original-Pods Service has no cluster IP yet".into(),
            )
        })
}

/// The RoleBinding (in the operator's namespace) of a router's identity.
pub fn carrier_binding_name(namespace: &str, mount: &str) -> String {
    let whole = format!("gefyra-carrier-{namespace}-{mount}");
    if whole.len() <= 253 {
        whole
    } else {
        format!("gefyra-carrier-{}", bridge::name_hash(&whole))
    }
}

/// Each planned Service not yet switched: its selector becomes the router's, its own is kept
/// in an annotation (a merge patch removes each of its keys and adds the router's).
async fn switch(services: &Api<Service>, mount: &str, plan: &Plan) -> Result<(), Failure> {
    for (service, original) in &plan.services {
        let current = services.get(service).await.map_err(|error| {
            Failure::transient(
                "SwitchService",
                format!("reading Service {service} failed: {error}"),
            )
        })?;
        let already = current
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(MOUNTED_BY_ANNOTATION))
            .map(String::as_str)
            == Some(mount);
        if already {
            continue;
        }
        let mut selector = serde_json::Map::new();
        for key in current
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
        {
            selector.insert(key.clone(), serde_json::Value::Null);
        }
        selector.insert(CARRIER_LABEL.into(), json!(mount));
        let patch = json!({
            "metadata": {
                "resourceVersion": current.metadata.resource_version,
                "annotations": {
                    MOUNTED_BY_ANNOTATION: mount,
                    ORIGINAL_SELECTOR_ANNOTATION: serde_json::to_string(original).unwrap_or_default(),
                },
            },
            "spec": {"selector": selector},
        });
        services
            .patch(service, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|error| {
                Failure::transient(
                    "SwitchService",
                    format!("switching Service {service} to the router failed: {error}"),
                )
            })?;
        info!(%mount, %service, "Service switched to the router");
    }
    Ok(())
}

/// Every Service of `namespace` this mount switched, switched back to its own selector.
async fn switch_back(services: &Api<Service>, mount: &str) -> Result<usize, Failure> {
    let list = services
        .list(&ListParams::default())
        .await
        .map_err(|error| {
            Failure::transient(
                "RestoreService",
                format!("listing Services failed: {error}"),
            )
        })?;
    let mut restored = 0;
    for service in list.items {
        let view = service_view(&service);
        let Some(original) = router::switched_by(&view, mount) else {
            continue;
        };
        let original: BTreeMap<String, String> = serde_json::from_str(original).unwrap_or_default();
        let mut selector = serde_json::Map::new();
        for key in view.selector.keys() {
            selector.insert(key.clone(), serde_json::Value::Null);
        }
        for (key, value) in &original {
            selector.insert(key.clone(), json!(value));
        }
        let name = view.name.to_string();
        let patch = json!({
            "metadata": {
                "resourceVersion": service.metadata.resource_version,
                "annotations": {MOUNTED_BY_ANNOTATION: null, ORIGINAL_SELECTOR_ANNOTATION: null},
            },
            "spec": {"selector": selector},
        });
        services
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|error| {
                Failure::transient(
                    "RestoreService",
                    format!("switching Service {name} back failed: {error}"),
                )
            })?;
        info!(%mount, service = %name, "Service switched back to the original Pods");
        restored += 1;
    }
    Ok(restored)
}

async fn cleanup(mount: &DynamicObject, bridging: &Bridging) -> Result<Action, Failure> {
    let name = mount.name_any();
    let fields = fields(mount);
    let namespace = fields.target_namespace.as_str();
    if fields.state.as_deref() != Some("RESTORING") {
        bridging
            .enter(
                mount,
                &mount_resource(),
                "RESTORING",
                &[],
                "Restoring",
                format!(
                    "switching the Services of {} back to its Pods",
                    fields.target
                ),
                EventType::Normal,
            )
            .await?;
    }
    let client = bridging.ctx.client.clone();
    // The mount's bridges go first: nothing is routed to a developer from here on.
    let bridges: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &bridging.ctx.settings.namespace,
        &super::bridge_resource(),
    );
    if let Err(error) = bridges
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&format!("{MOUNT_LABEL}={name}")),
        )
        .await
    {
        warn!(mount = %name, %error, "deleting the mount's bridges failed; retrying");
        return Err(Failure::transient(
            "DeleteBridges",
            format!("deleting the bridges of mount {name} failed: {error}"),
        ));
    }
    if !namespace.is_empty() {
        let services: Api<Service> = Api::namespaced(client.clone(), namespace);
        match switch_back(&services, &name).await {
            Ok(0) => {}
            Ok(_) => tokio::time::sleep(DRAIN).await,
            Err(failure) => return Err(failure),
        }
        let gone = |result: Result<_, kube::Error>, what: &str| match result {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(error) => Err(Failure::transient(
                "RemoveRouter",
                format!("deleting {what} in namespace {namespace} failed: {error}"),
            )),
        };
        let router = router_name(&name);
        // Foreground: the Deployment stays until its Pods are gone. Until then a node whose
        // proxy still sends to the router has its requests forwarded to the original, so the
        // original-Pods Service (the router's upstream) goes only after the router.
        let deployments = Api::<Deployment>::namespaced(client.clone(), namespace);
        gone(
            deployments
                .delete(&router, &DeleteParams::foreground())
                .await
                .map(|_| ()),
            "the router Deployment",
        )?;
        // Within the cleanup (the finalizer goes as soon as it returns Ok): the router's
        // grace period is its shutdown delay plus its drain time, well under this.
        let mut waited = Duration::ZERO;
        loop {
            match deployments.get_opt(&router).await {
                Ok(None) => break,
                Ok(Some(_)) if waited < ROUTER_GONE_WITHIN => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    waited += Duration::from_secs(1);
                }
                Ok(Some(_)) => {
                    return Err(Failure::transient(
                        "RemoveRouter",
                        format!(
                            "the router {router} in namespace {namespace} has not gone after {}s; its Pods may be stuck terminating (kubectl -n {namespace} get pods -l {CARRIER_LABEL}={name})",
                            ROUTER_GONE_WITHIN.as_secs()
                        ),
                    ));
                }
                Err(error) => {
                    return Err(Failure::transient(
                        "RemoveRouter",
                        format!(
                            "reading the router Deployment in namespace {namespace} failed: {error}"
                        ),
                    ));
                }
            }
        }
        gone(
            Api::<Service>::namespaced(client.clone(), namespace)
                .delete(&original_service_name(&name), &DeleteParams::default())
                .await
                .map(|_| ()),
            "the original-Pods Service",
        )?;
        gone(
            Api::<ServiceAccount>::namespaced(client.clone(), namespace)
                .delete(&router, &DeleteParams::default())
                .await
                .map(|_| ()),
            "the router's ServiceAccount",
        )?;
        gone(
            Api::<RoleBinding>::namespaced(client.clone(), &bridging.ctx.settings.namespace)
                .delete(
                    &carrier_binding_name(namespace, &name),
                    &DeleteParams::default(),
                )
                .await
                .map(|_| ()),
            "the router's RoleBinding",
        )?;
    }
    info!(mount = %name, %namespace, "mount removed; the workload's Services select its Pods again");
    Ok(Action::await_change())
}

/// The ports a mount's router listens on, as the operator recorded them when it became ACTIVE.
pub fn routed_ports(mount: &DynamicObject) -> BTreeSet<u16> {
    mount
        .data
        .pointer("/status/ports")
        .and_then(|ports| ports.as_array())
        .map(|ports| {
            ports
                .iter()
                .filter_map(|p| p.as_u64())
                .filter_map(|p| u16::try_from(p).ok())
                .collect()
        })
        .unwrap_or_default()
}
