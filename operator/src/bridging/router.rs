//! What a mount puts in its workload's namespace, planned without I/O: which Services it
//! switches to its router (those that select the workload's Pods), the ports the router
//! listens on, the Service that still reaches the original Pods, and the router itself.
//!
//! Why a router in front and not Gefyra's way: Gefyra replaces the target container's image
//! with its carrier and so restarts every Pod of the workload (and restores with a rollout
//! restart). Here the workload's Pods are never touched: a router Deployment starts beside
//! them, the Services that select them are switched to the router once it is Ready (new
//! connections go to it, established ones finish where they are), and switched back before
//! the router goes. The router sends everything no bridge takes to the original Pods
//! through a Service of their own.

use std::collections::{BTreeMap, BTreeSet};

use gefyra_api::bridge::{CARRIER_LABEL, MOUNT_LABEL, original_service_name, router_name};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, HTTPGetAction, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext, Service,
    ServicePort, ServiceSpec, Sysctl,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The annotation on a switched Service holding its own selector (JSON), to switch back.
pub const ORIGINAL_SELECTOR_ANNOTATION: &str = "gefyra.dev/original-selector";
/// The annotation on a switched Service naming the mount that switched it.
pub const MOUNTED_BY_ANNOTATION: &str = "gefyra.dev/bridge-mount";
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "gefyra-operator");

/// The Pods a mount is about: the labels their template gives them and the workload's
/// selector (which the original-Pods Service uses), with their containers' named ports.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub labels: BTreeMap<String, String>,
    pub selector: BTreeMap<String, String>,
    /// Every container's ports by name (for Services whose targetPort is a name).
    pub named_ports: BTreeMap<String, i32>,
    /// The container the mount names, which must exist.
    pub containers: Vec<String>,
}

/// What to switch and what to listen on.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The Services to switch to the router (name and their own selector).
    pub services: Vec<(String, BTreeMap<String, String>)>,
    /// The container ports the router listens on: every target port of those Services.
    pub ports: BTreeSet<u16>,
}

/// Why a mount cannot be put in front of its workload.
#[derive(Clone, Debug, PartialEq)]
pub enum PlanProblem {
    /// No Service selects the Pods: nothing would reach the router.
    NoService,
    /// A Service selecting the Pods is switched by another mount.
    MountedByAnother { service: String, mount: String },
}

impl std::fmt::Display for PlanProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanProblem::NoService => write!(
                f,
                "no Service selects the workload's Pods: bridging takes the traffic of the workload's Services (Pods reached by their own IP are not bridged)"
            ),
            PlanProblem::MountedByAnother { service, mount } => write!(
                f,
                "Service {service} is already switched to the router of GefyraBridgeMount {mount}: one mount per workload; bridge that mount instead"
            ),
        }
    }
}

/// A Service as the plan sees it.
pub struct ServiceView<'a> {
    pub name: &'a str,
    pub selector: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub headless: bool,
    /// (port name, target port) of each port.
    pub target_ports: Vec<Option<IntOrString>>,
    pub ports: Vec<i32>,
}

/// The selector a Service had before `mount` switched it, if it did.
pub fn switched_by<'a>(service: &'a ServiceView, mount: &str) -> Option<&'a str> {
    (service
        .annotations
        .get(MOUNTED_BY_ANNOTATION)
        .map(String::as_str)
        == Some(mount))
    .then(|| {
        service
            .annotations
            .get(ORIGINAL_SELECTOR_ANNOTATION)
            .map(String::as_str)
    })
    .flatten()
}

/// The Services of the namespace that select the workload's Pods (their own selector a
/// non-empty subset of the Pods' labels), or that this mount switched already, and the ports
/// the router must listen on for them. Headless Services are left alone (their clients reach
/// Pods by IP, past any router): a documented limit.
pub fn plan(
    mount: &str,
    workload: &Workload,
    services: &[ServiceView],
) -> Result<Plan, PlanProblem> {
    let mut planned = Vec::new();
    let mut ports = BTreeSet::new();
    for service in services {
        // A switched Service (by this mount or another) counts by the selector it had.
        let mounted_by = service.annotations.get(MOUNTED_BY_ANNOTATION);
        let selector = match (
            mounted_by,
            service.annotations.get(ORIGINAL_SELECTOR_ANNOTATION),
        ) {
            (Some(_), Some(original)) => {
                match serde_json::from_str::<BTreeMap<String, String>>(original) {
                    Ok(selector) => selector,
                    Err(_) => continue,
                }
            }
            _ => service.selector.clone(),
        };
        if service.headless || selector.is_empty() {
            continue;
        }
        let selects = selector
            .iter()
            .all(|(key, value)| workload.labels.get(key) == Some(value));
        if !selects {
            continue;
        }
        if let Some(other) = mounted_by
            && other != mount
        {
            return Err(PlanProblem::MountedByAnother {
                service: service.name.to_string(),
                mount: other.clone(),
            });
        }
        for (target, port) in service.target_ports.iter().zip(&service.ports) {
            let container_port = match target {
                None => Some(*port),
                Some(IntOrString::Int(port)) => Some(*port),
                Some(IntOrString::String(name)) => workload.named_ports.get(name).copied(),
            };
            if let Some(port) = container_port.and_then(|port| u16::try_from(port).ok())
                && port > 0
            {
                ports.insert(port);
            }
        }
        planned.push((service.name.to_string(), selector));
    }
    if planned.is_empty() || ports.is_empty() {
        return Err(PlanProblem::NoService);
    }
    Ok(Plan {
        services: planned,
        ports,
    })
}

fn labels(mount: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (MOUNT_LABEL.to_string(), mount.to_string()),
    ])
}

fn meta(name: String, namespace: &str, mount: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.to_string()),
        labels: Some(labels(mount)),
        ..ObjectMeta::default()
    }
}

/// The Service that reaches the original Pods (the workload's selector) on every port the
/// router listens on, for the router's traffic that no bridge takes.
pub fn original_service(
    mount: &str,
    namespace: &str,
    workload: &Workload,
    ports: &BTreeSet<u16>,
) -> Service {
    Service {
        metadata: meta(original_service_name(mount), namespace, mount),
        spec: Some(ServiceSpec {
            selector: Some(workload.selector.clone()),
            ports: Some(
                ports
                    .iter()
                    .map(|port| ServicePort {
                        name: Some(format!("port-{port}")),
                        port: i32::from(*port),
                        target_port: Some(IntOrString::Int(i32::from(*port))),
                        protocol: Some("TCP".into()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// What the router is told.
pub struct RouterSettings<'a> {
    pub image: &'a str,
    pub bridges_namespace: &'a str,
    /// Stowaway's bridge port (address:port).
    pub stowaway: &'a str,
    /// The original-Pods Service's cluster IP.
    pub original_ip: &'a str,
}

/// The router's health port: 8090 unless the workload listens there.
pub fn health_port(ports: &BTreeSet<u16>) -> u16 {
    [8090, 18090, 28090, 38090]
        .into_iter()
        .find(|port| !ports.contains(port))
        .unwrap_or(48090)
}

/// The router Deployment: one replica of `gefyra-carrier` from the operator's image, as
/// restricted as the chart's own Pods, listening on the workload's ports (named as the
/// workload names them, so that Services with named target ports reach it).
pub fn router_deployment(
    mount: &str,
    namespace: &str,
    workload: &Workload,
    ports: &BTreeSet<u16>,
    settings: &RouterSettings,
) -> Deployment {
    let name = router_name(mount);
    let pod_labels = BTreeMap::from([
        (CARRIER_LABEL.to_string(), mount.to_string()),
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (
            "app.kubernetes.io/name".to_string(),
            "gefyra-carrier".to_string(),
        ),
    ]);
    let health = health_port(ports);
    let mut args = vec![
        "--mount".to_string(),
        mount.to_string(),
        "--bridges-namespace".to_string(),
        settings.bridges_namespace.to_string(),
        "--stowaway".to_string(),
        settings.stowaway.to_string(),
        "--health-listen".to_string(),
        format!("0.0.0.0:{health}"),
    ];
    for port in ports {
        args.push("--port".into());
        args.push(format!("{port}={}:{port}", settings.original_ip));
    }
    let name_of = |port: u16| {
        workload
            .named_ports
            .iter()
            .find(|(_, number)| **number == i32::from(port))
            .map(|(name, _)| name.clone())
    };
    let mut container_ports: Vec<ContainerPort> = ports
        .iter()
        .map(|port| ContainerPort {
            container_port: i32::from(*port),
            name: name_of(*port),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        })
        .collect();
    container_ports.push(ContainerPort {
        container_port: i32::from(health),
        name: Some("gefyra-health".into()),
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    });
    // Ports below 1024 without a capability: the one sysctl the restricted profile allows.
    let sysctls = ports.iter().any(|port| *port < 1024).then(|| {
        vec![Sysctl {
            name: "net.ipv4.ip_unprivileged_port_start".into(),
            value: "0".into(),
        }]
    });
    Deployment {
        metadata: meta(name.clone(), namespace, mount),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    CARRIER_LABEL.to_string(),
                    mount.to_string(),
                )])),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(k8s_openapi::api::apps::v1::RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(name.clone()),
                    automount_service_account_token: Some(true),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(20),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        sysctls,
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![Container {
                        name: "carrier".into(),
                        image: Some(settings.image.to_string()),
                        image_pull_policy: Some("IfNotPresent".into()),
                        command: Some(vec!["/usr/local/bin/gefyra-carrier".into()]),
                        args: Some(args),
                        ports: Some(container_ports),
                        readiness_probe: Some(Probe {
                            http_get: Some(HTTPGetAction {
                                path: Some("/ready".into()),
                                port: IntOrString::Int(i32::from(health)),
                                ..HTTPGetAction::default()
                            }),
                            period_seconds: Some(1),
                            failure_threshold: Some(1),
                            ..Probe::default()
                        }),
                        resources: Some(ResourceRequirements {
                            requests: Some(BTreeMap::from([
                                ("cpu".to_string(), Quantity("10m".into())),
                                ("memory".to_string(), Quantity("16Mi".into())),
                            ])),
                            limits: Some(BTreeMap::from([(
                                "memory".to_string(),
                                Quantity("256Mi".into()),
                            )])),
                            ..ResourceRequirements::default()
                        }),
                        security_context: Some(SecurityContext {
                            allow_privilege_escalation: Some(false),
                            read_only_root_filesystem: Some(true),
                            capabilities: Some(Capabilities {
                                drop: Some(vec!["ALL".into()]),
                                ..Capabilities::default()
                            }),
                            ..SecurityContext::default()
                        }),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload() -> Workload {
        Workload {
            labels: BTreeMap::from([
                ("app".to_string(), "web".to_string()),
                ("tier".to_string(), "front".to_string()),
            ]),
            selector: BTreeMap::from([("app".to_string(), "web".to_string())]),
            named_ports: BTreeMap::from([("http".to_string(), 8080)]),
            containers: vec!["web".into()],
        }
    }

    fn service<'a>(
        name: &'a str,
        selector: &[(&str, &str)],
        target: IntOrString,
    ) -> ServiceView<'a> {
        ServiceView {
            name,
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: BTreeMap::new(),
            headless: false,
            target_ports: vec![Some(target)],
            ports: vec![80],
        }
    }

    #[test]
    fn services_selecting_the_pods_are_switched_and_their_target_ports_listened_on() {
        let services = [
            service("web", &[("app", "web")], IntOrString::String("http".into())),
            service(
                "metrics",
                &[("app", "web"), ("tier", "front")],
                IntOrString::Int(9090),
            ),
            service("other", &[("app", "db")], IntOrString::Int(5432)),
            service("everything", &[], IntOrString::Int(1)),
        ];
        let plan = plan("m", &workload(), &services).unwrap();
        assert_eq!(
            plan.services
                .iter()
                .map(|(name, _)| name.as_str())
                .collect::<Vec<_>>(),
            ["web", "metrics"]
        );
        assert_eq!(plan.ports, BTreeSet::from([8080, 9090]));
    }

    #[test]
    fn a_switched_service_is_planned_by_its_own_selector_and_another_mounts_is_refused() {
        let mut switched = service("web", &[(CARRIER_LABEL, "m")], IntOrString::Int(8080));
        switched.annotations = BTreeMap::from([
            (MOUNTED_BY_ANNOTATION.to_string(), "m".to_string()),
            (
                ORIGINAL_SELECTOR_ANNOTATION.to_string(),
                r#"{"app":"web"}"#.to_string(),
            ),
        ]);
        let plan = plan("m", &workload(), std::slice::from_ref(&switched)).unwrap();
        assert_eq!(plan.services[0].1["app"], "web");
        assert_eq!(
            super::plan("other", &workload(), &[switched]),
            Err(PlanProblem::MountedByAnother {
                service: "web".into(),
                mount: "m".into()
            })
        );
        let mut annotated = service("web", &[("app", "web")], IntOrString::Int(8080));
        annotated
            .annotations
            .insert(MOUNTED_BY_ANNOTATION.into(), "m".into());
        assert!(matches!(
            super::plan("other", &workload(), &[annotated]),
            Err(PlanProblem::MountedByAnother { .. })
        ));
    }

    #[test]
    fn headless_services_and_none_selecting_leave_nothing_to_switch() {
        let mut headless = service("web", &[("app", "web")], IntOrString::Int(8080));
        headless.headless = true;
        assert_eq!(
            plan("m", &workload(), &[headless]),
            Err(PlanProblem::NoService)
        );
    }

    #[test]
    fn the_router_runs_restricted_on_the_workloads_ports() {
        let ports = BTreeSet::from([80, 8080]);
        let deployment = router_deployment(
            "m",
            "demo",
            &workload(),
            &ports,
            &RouterSettings {
                image: "gefyra-operator:1",
                bridges_namespace: "gefyra",
                stowaway: "10.0.0.9:8082",
                original_ip: "10.0.0.7",
            },
        );
        let pod = deployment.spec.unwrap().template.spec.unwrap();
        let container = &pod.containers[0];
        let args = container.args.as_ref().unwrap();
        assert!(args.contains(&"8080=10.0.0.7:8080".to_string()), "{args:?}");
        assert_eq!(
            container.ports.as_ref().unwrap()[1].name.as_deref(),
            Some("http"),
            "named as the workload names it"
        );
        assert_eq!(pod.security_context.unwrap().sysctls.unwrap().len(), 1);
        assert_eq!(health_port(&BTreeSet::from([8090])), 18090);
    }
}
