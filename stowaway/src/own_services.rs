//! Stowaway's own Services (the chart's bridges and metrics ClusterIPs and WireGuard
//! Service): their
//! addresses lead back to Stowaway (kube-proxy hairpins them to its pod), so peers never
//! reach them — as its pod's own addresses. Read from the API by name (Stowaway's Role may
//! get exactly these), at startup and every `REFRESH`; the addresses are pure data here.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::{Api, Client};

use crate::dataplane::Handle;

/// The Services the chart makes for Stowaway (`charts/gefyra-operator/templates/services.yaml`).
pub const OWN_SERVICES: [&str; 3] = [
    "gefyra-stowaway-bridges",
    "gefyra-stowaway-metrics",
    "gefyra-stowaway-wireguard",
];
/// How often they are read again (a Service recreated gets a new ClusterIP).
const REFRESH: Duration = Duration::from_secs(10);

/// Every address a Service answers on inside the cluster: its cluster IPs, external IPs
/// and load-balancer addresses.
pub fn addresses(service: &Service) -> Vec<IpAddr> {
    let spec = service.spec.as_ref();
    let cluster_ips = spec
        .and_then(|spec| spec.cluster_ips.clone())
        .or_else(|| {
            spec.and_then(|spec| spec.cluster_ip.clone())
                .map(|ip| vec![ip])
        })
        .unwrap_or_default();
    let external_ips = spec
        .and_then(|spec| spec.external_ips.clone())
        .unwrap_or_default();
    let load_balancer: Vec<String> = service
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|balancer| balancer.ingress.as_ref())
        .map(|ingress| {
            ingress
                .iter()
                .filter_map(|entry| entry.ip.clone())
                .collect()
        })
        .unwrap_or_default();
    let mut all: Vec<IpAddr> = cluster_ips
        .iter()
        .chain(&external_ips)
        .chain(&load_balancer)
        // "None" (headless) and anything else that is no address.
        .filter_map(|text| text.parse::<IpAddr>().ok())
        .map(|address| address.to_canonical())
        .collect();
    all.sort();
    all.dedup();
    all
}

/// The addresses of Stowaway's own Services in `namespace` (a missing one has none);
/// `None` when the API could not say (the caller keeps what it knew).
pub async fn fetch(client: &Client, namespace: &str) -> Option<Vec<IpAddr>> {
    let api: Api<Service> = Api::namespaced(client.clone(), namespace);
    let mut all = Vec::new();
    for name in OWN_SERVICES {
        match api.get_opt(name).await {
            Ok(Some(service)) => all.extend(addresses(&service)),
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(service = name, namespace, %error, "reading Stowaway's own Service failed (its addresses must stay unreachable through the tunnel); retrying");
                return None;
            }
        }
    }
    all.sort();
    all.dedup();
    Some(all)
}

/// Keeps the data plane told of its own Services' addresses (from `known` on).
pub async fn keep_own_services(
    client: Client,
    namespace: String,
    handle: Handle,
    mut known: Vec<IpAddr>,
) {
    loop {
        tokio::time::sleep(REFRESH).await;
        if let Some(now) = fetch(&client, &namespace).await
            && now != known
        {
            tracing::info!(addresses = ?now, "Stowaway's own Services changed; refusing their addresses");
            handle.set_own_services(now.clone());
            known = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, ServiceSpec, ServiceStatus,
    };

    #[test]
    fn a_services_addresses_are_its_cluster_external_and_load_balancer_ips() {
        let service = Service {
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.96.0.20".into()),
                cluster_ips: Some(vec!["10.96.0.20".into(), "fd00:10:96::20".into()]),
                external_ips: Some(vec!["192.0.2.7".into()]),
                ..ServiceSpec::default()
            }),
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(vec![
                        LoadBalancerIngress {
                            ip: Some("198.51.100.9".into()),
                            ..LoadBalancerIngress::default()
                        },
                        LoadBalancerIngress {
                            hostname: Some("lb.example".into()),
                            ..LoadBalancerIngress::default()
                        },
                    ]),
                }),
                ..ServiceStatus::default()
            }),
            ..Service::default()
        };
        let expected: Vec<IpAddr> = ["10.96.0.20", "192.0.2.7", "198.51.100.9", "fd00:10:96::20"]
            .map(|address| address.parse().unwrap())
            .to_vec();
        assert_eq!(addresses(&service), expected);
        // A headless Service, or one with only the old single field.
        let headless = Service {
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        };
        assert!(addresses(&headless).is_empty());
        let single = Service {
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.96.0.21".into()),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        };
        assert_eq!(
            addresses(&single),
            ["10.96.0.21".parse::<IpAddr>().unwrap()]
        );
    }
}
