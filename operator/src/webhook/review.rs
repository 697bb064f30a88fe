//! The webhook's decision, pure: refuse, with code 500, a subnet another client, a tunnel
//! pool or a reserved range already has; allow everything else (the CRD validates the
//! form). The routes it checks against come from the watched shards, looked up by name.

use std::collections::BTreeMap;
use std::sync::Arc;

use gefyra_api::connection::ProviderParameter;
use gefyra_api::ipam::{self, IpamError, Pool, Routes};
use gefyra_api::route_shards;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use serde_json::{Value, json};
use tracing::info;

/// Why a subnet is refused: what the sender is told, and what only the operator's log
/// says (another client's name and range).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub message: String,
    pub detail: Option<String>,
}

/// The subnet a client object asks for, if it parses.
fn subnet_of(object: &DynamicObject) -> Option<IpNet> {
    let parameter = object.data.get("providerParameter")?.as_object()?;
    ProviderParameter::parse(parameter).ok()?.subnet
}

/// Whether `client` may route `subnet`, given the pool and the routes that may overlap it.
/// A refusal never names another client: a sender learns only that the range is taken.
pub fn check(pool: &Pool, routes: &Routes, client: &str, subnet: IpNet) -> Result<(), Refusal> {
    // The message says what kind of range is in the way; whose it is goes to the log only.
    ipam::check_routed(pool, routes, client, subnet).map_err(|error| Refusal {
        message: format!("providerParameter.subnet: {error}; choose another subnet"),
        detail: match &error {
            IpamError::Overlap { occupant, .. } => occupant
                .other_client()
                .map(|(other, route)| format!("{route} of client {other}")),
            _ => None,
        },
    })
}

/// The decision on one review: a refusal carries code 500 and reason `SubnetConflict`
/// (Gefyra's CLI picks another subnet on exactly this code), and the refusal for the log.
pub fn review(
    request: &AdmissionRequest<DynamicObject>,
    pool: &Pool,
    routes: &Routes,
) -> (AdmissionResponse, Option<Refusal>) {
    let response = AdmissionResponse::from(request);
    let Some(object) = request.object.as_ref() else {
        return (response, None);
    };
    let Some(subnet) = subnet_of(object) else {
        return (response, None);
    };
    if request.old_object.as_ref().and_then(subnet_of) == Some(subnet) {
        return (response, None);
    }
    let name = object.metadata.name.clone().unwrap_or_default();
    match check(pool, routes, &name, subnet) {
        Ok(()) => (response, None),
        Err(refusal) => {
            let mut refused = response.deny(refusal.message.clone());
            refused.result.code = 500;
            refused.result.reason = "SubnetConflict".into();
            (refused, Some(refusal))
        }
    }
}

/// The routes that may overlap `subnet`: those of the shards it would be recorded in, as
/// `shard` finds them (by name); none for a subnet too wide to be routed at all.
pub fn routes_near(subnet: &IpNet, shard: impl Fn(&str) -> Option<Arc<ConfigMap>>) -> Routes {
    let found: Vec<BTreeMap<String, String>> = route_shards::shards_of(subnet)
        .unwrap_or_default()
        .iter()
        .filter_map(|name| shard(name)?.data.clone())
        .collect();
    route_shards::merge(&found)
}

/// The answer (an AdmissionReview, JSON) to the review in `body`, with the routes from
/// `shard`. A body that is not a review is answered as invalid; a refusal is logged with
/// what the answer leaves out.
pub fn answer(body: &[u8], pool: &Pool, shard: impl Fn(&str) -> Option<Arc<ConfigMap>>) -> Vec<u8> {
    let request = serde_json::from_slice::<AdmissionReview<DynamicObject>>(body)
        .map_err(|error| error.to_string())
        .and_then(|review| {
            let request: Result<AdmissionRequest<DynamicObject>, _> = review.try_into();
            request.map_err(|error| error.to_string())
        });
    let response = match request {
        Err(error) => AdmissionResponse::invalid(error),
        Ok(request) => {
            let routes = request
                .object
                .as_ref()
                .and_then(subnet_of)
                .map(|subnet| routes_near(&subnet, &shard))
                .unwrap_or_default();
            let (response, refusal) = review(&request, pool, &routes);
            if let Some(Refusal { message, detail }) = refusal {
                let client = request.name.as_str();
                info!(client, conflict = detail.as_deref().unwrap_or("-"), %message, "the subnet webhook refused a subnet");
            }
            response
        }
    };
    serde_json::to_vec(&response.into_review()).expect("an admission review serializes")
}

/// The review as the API server sends it, for tests.
pub fn review_body(object: Value, old_object: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u-1",
            "kind": {"group": "gefyra.dev", "version": "v1", "kind": "gefyraclient"},
            "resource": {"group": "gefyra.dev", "version": "v1", "resource": "gefyraclients"},
            "operation": "UPDATE",
            "userInfo": {"username": "system:serviceaccount:gefyra:gefyra-client-b"},
            "object": object,
            "oldObject": old_object,
            "dryRun": false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(name: &str, subnet: Option<&str>) -> Value {
        let mut object = json!({"apiVersion": "gefyra.dev/v1", "kind": "gefyraclient",
            "metadata": {"name": name, "namespace": "gefyra"}, "provider": "stowaway"});
        if let Some(subnet) = subnet {
            object["providerParameter"] = json!({"subnet": subnet});
        }
        object
    }

    fn request(object: Value, old_object: Value) -> AdmissionRequest<DynamicObject> {
        let review: AdmissionReview<DynamicObject> =
            serde_json::from_value(review_body(object, old_object)).unwrap();
        review.try_into().unwrap()
    }

    fn route_of_a() -> Routes {
        Routes::from([(
            "a".to_string(),
            ipam::Route {
                uid: "u-a".into(),
                subnet: "172.20.0.0/16".parse().unwrap(),
            },
        )])
    }

    #[test]
    fn a_taken_subnet_is_refused_with_the_code_gefyras_cli_retries_on() {
        let routes = route_of_a();
        let pool = Pool::default();
        let decide = |name: &str, subnet: Option<&str>, old: Option<&str>| {
            review(
                &request(client(name, subnet), client(name, old)),
                &pool,
                &routes,
            )
        };
        let (taken, refusal) = decide("b", Some("172.20.5.0/24"), None);
        assert!(!taken.allowed);
        assert_eq!(taken.result.code, 500);
        assert_eq!(taken.result.reason, "SubnetConflict");
        assert_eq!(
            taken.result.message,
            "providerParameter.subnet: subnet 172.20.5.0/24 overlaps another client's range; choose another subnet"
        );
        // The other client's name and range stay in the operator's log.
        assert_eq!(
            refusal.unwrap().detail.as_deref(),
            Some("172.20.0.0/16 of client a")
        );
        assert!(decide("b", Some("172.21.0.0/16"), None).0.allowed);
        // Its own route, unchanged subnets and disconnects are never refused.
        assert!(decide("a", Some("172.20.0.0/16"), None).0.allowed);
        assert!(
            decide("b", Some("172.20.5.0/24"), Some("172.20.5.0/24"))
                .0
                .allowed
        );
        assert!(decide("b", None, Some("172.21.0.0/16")).0.allowed);
        let (pool_overlap, refusal) = decide("b", Some("192.168.96.0/24"), None);
        assert_eq!(pool_overlap.result.code, 500);
        assert!(
            pool_overlap.result.message.contains("tunnel pool"),
            "{}",
            pool_overlap.result.message
        );
        assert_eq!(refusal.unwrap().detail, None);
    }

    fn shard(name: &str, routes: &Routes) -> Arc<ConfigMap> {
        Arc::new(ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            data: Some(crate::routes::encode_shard(routes, &BTreeMap::new())),
            ..ConfigMap::default()
        })
    }

    #[test]
    fn only_the_shards_a_subnet_would_be_recorded_in_are_looked_up() {
        let cache = BTreeMap::from([(
            "gefyra-routes-v4-172-20".to_string(),
            shard("gefyra-routes-v4-172-20", &route_of_a()),
        )]);
        let asked = std::sync::Mutex::new(Vec::new());
        let lookup = |name: &str| {
            asked.lock().unwrap().push(name.to_string());
            cache.get(name).cloned()
        };
        assert_eq!(
            routes_near(&"172.20.5.0/24".parse().unwrap(), lookup),
            route_of_a()
        );
        assert_eq!(*asked.lock().unwrap(), ["gefyra-routes-v4-172-20"]);
        asked.lock().unwrap().clear();
        // A /14 covers 4 shards: 4 look-ups in memory, no request.
        assert_eq!(
            routes_near(&"172.20.0.0/14".parse().unwrap(), lookup),
            route_of_a()
        );
        assert_eq!(asked.lock().unwrap().len(), 4);
        asked.lock().unwrap().clear();
        // Too wide to be routed: nothing looked up (the review refuses it by its form).
        assert!(routes_near(&"172.0.0.0/8".parse().unwrap(), lookup).is_empty());
        assert!(asked.lock().unwrap().is_empty());
    }

    #[test]
    fn an_answer_is_a_review_whatever_the_body() {
        let cache = BTreeMap::from([(
            "gefyra-routes-v4-172-20".to_string(),
            shard("gefyra-routes-v4-172-20", &route_of_a()),
        )]);
        let lookup = |name: &str| cache.get(name).cloned();
        let body = serde_json::to_vec(&review_body(
            client("b", Some("172.20.5.0/24")),
            client("b", None),
        ))
        .unwrap();
        let answered: Value =
            serde_json::from_slice(&answer(&body, &Pool::default(), lookup)).unwrap();
        assert_eq!(answered["kind"], "AdmissionReview");
        assert_eq!(answered["response"]["uid"], "u-1");
        assert_eq!(answered["response"]["allowed"], false);
        assert_eq!(answered["response"]["status"]["code"], 500);
        let garbage: Value =
            serde_json::from_slice(&answer(b"{not json", &Pool::default(), lookup)).unwrap();
        assert_eq!(garbage["response"]["allowed"], false);
    }
}
