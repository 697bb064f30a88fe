//! The route table: per container port, the ACTIVE bridges in the order they take traffic
//! (oldest first), each with its compiled rules and its preamble to Stowaway. Built whole
//! from the watched GefyraBridges (pure) and swapped in as one value, so a connection or
//! request always sees one consistent table.

use std::collections::BTreeMap;
use std::sync::Arc;

use gefyra_api::bridge_rules::{ROUTED_STATE, Rules, port_mappings};
use gefyra_api::bridge_wire::preamble;
use kube::core::DynamicObject;
use serde_json::Value;

/// One bridge on one container port.
#[derive(Debug)]
pub struct Route {
    pub bridge: Arc<str>,
    /// The port on the developer's machine (Stowaway resolves it; here for the logs).
    pub local_port: u16,
    pub rules: Rules,
    /// `GEFYRA-BRIDGE/1 <bridge> <port>\n`, sent first on each connection to Stowaway.
    pub preamble: Arc<[u8]>,
}

/// How a connection accepted on a port is handled, decided when it is accepted.
#[derive(Debug, Clone)]
pub enum Mode {
    /// No bridge: bytes to the original, untouched.
    Original,
    /// A bridge without rules takes the port's traffic: bytes to Stowaway after its preamble.
    BridgeRaw(Arc<Route>),
    /// Bridges with rules: requests are parsed and each goes where the rules say.
    Http,
}

/// A bridge left out of the table, and why (a bridge not ACTIVE is no skip: it waits).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Skipped {
    pub bridge: String,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    ports: BTreeMap<u16, Vec<Arc<Route>>>,
}

/// The fields the router reads, ordered as bridges take traffic: oldest first, then by name.
struct Candidate<'o> {
    created: Option<jiff::Timestamp>,
    name: &'o str,
    object: &'o DynamicObject,
}

impl RouteTable {
    /// The table of `bridges` (the watched objects of one mount): only ACTIVE ones; a bridge
    /// whose `portMappings` or rules do not parse is skipped and named in the second value.
    pub fn build<'o>(
        bridges: impl IntoIterator<Item = &'o DynamicObject>,
    ) -> (RouteTable, Vec<Skipped>) {
        let mut candidates: Vec<Candidate<'o>> = bridges
            .into_iter()
            .filter(|object| object.data.get("state").and_then(Value::as_str) == Some(ROUTED_STATE))
            .filter_map(|object| {
                Some(Candidate {
                    created: object
                        .metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|time| time.0),
                    name: object.metadata.name.as_deref()?,
                    object,
                })
            })
            .collect();
        // No timestamp (never from the API server) sorts last.
        candidates.sort_by(|a, b| {
            (a.created.is_none(), a.created, a.name).cmp(&(b.created.is_none(), b.created, b.name))
        });

        let mut table = RouteTable::default();
        let mut skipped = Vec::new();
        for candidate in candidates {
            match routes(candidate.name, &candidate.object.data) {
                Ok(routes) => {
                    for (port, route) in routes {
                        table.ports.entry(port).or_default().push(Arc::new(route));
                    }
                }
                Err(reason) => skipped.push(Skipped {
                    bridge: candidate.name.to_string(),
                    reason,
                }),
            }
        }
        (table, skipped)
    }

    /// How a connection accepted on container port `port` is handled now.
    pub fn mode(&self, port: u16) -> Mode {
        match self.ports.get(&port) {
            None => Mode::Original,
            Some(routes) => match routes.iter().find(|route| route.rules.is_empty()) {
                Some(raw) => Mode::BridgeRaw(Arc::clone(raw)),
                None => Mode::Http,
            },
        }
    }

    /// The bridge a request on `port` goes to: the first (oldest) whose rules match; `None`:
    /// the original. `headers` as for [`Rules::matches`].
    pub fn route<'h, F, I>(
        &self,
        port: u16,
        path_and_query: &str,
        headers: F,
    ) -> Option<&Arc<Route>>
    where
        F: Fn() -> I,
        I: Iterator<Item = (&'h str, &'h [u8])>,
    {
        self.ports
            .get(&port)?
            .iter()
            .find(|route| route.rules.matches(path_and_query, &headers))
    }

    /// The routes on `port`, in order.
    pub fn routes(&self, port: u16) -> &[Arc<Route>] {
        self.ports.get(&port).map_or(&[], Vec::as_slice)
    }

    /// The ports any bridge maps.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports.keys().copied()
    }

    /// Bridges routed on at least one port.
    pub fn bridge_count(&self) -> usize {
        let mut names: Vec<&str> = self
            .ports
            .values()
            .flatten()
            .map(|route| &*route.bridge)
            .collect();
        names.sort_unstable();
        names.dedup();
        names.len()
    }
}

/// One bridge's routes, one per mapped container port; `Err`: why it cannot be routed.
fn routes(name: &str, data: &Value) -> Result<Vec<(u16, Route)>, String> {
    let mappings: Vec<String> = match data.get("portMappings") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or("portMappings: every entry must be a string")?,
        _ => return Err("portMappings: must be a list".to_string()),
    };
    let mappings = port_mappings(&mappings).map_err(|error| error.to_string())?;
    let rules = Rules::compile(data.get("providerParameter")).map_err(|error| error.to_string())?;
    let bridge: Arc<str> = Arc::from(name);
    mappings
        .into_iter()
        .map(|mapping| {
            let preamble = preamble(name, mapping.remote)
                .map_err(|error| format!("metadata.name: {error}"))?;
            Ok((
                mapping.remote,
                Route {
                    bridge: Arc::clone(&bridge),
                    local_port: mapping.local,
                    rules: rules.clone(),
                    preamble: Arc::from(preamble.into_bytes()),
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub fn bridge(
        name: &str,
        created: &str,
        state: &str,
        ports: &[&str],
        parameter: Value,
    ) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "gefyra.dev/v1",
            "kind": "gefyrabridge",
            "metadata": {"name": name, "namespace": "gefyra", "creationTimestamp": created},
            "provider": "carrier2",
            "state": state,
            "portMappings": ports,
            "providerParameter": parameter,
        }))
        .expect("a bridge object")
    }

    fn header_rule(value: &str) -> Value {
        json!({"rules": [{"match": [{"matchHeader": {"name": "x-gefyra", "value": value}}]}]})
    }

    fn names(table: &RouteTable, port: u16) -> Vec<&str> {
        table
            .routes(port)
            .iter()
            .map(|route| &*route.bridge)
            .collect()
    }

    #[test]
    fn only_active_bridges_oldest_first_then_by_name() {
        let objects = [
            bridge(
                "c",
                "2026-01-01T00:00:02Z",
                "ACTIVE",
                &["1:80"],
                header_rule("c"),
            ),
            bridge(
                "b",
                "2026-01-01T00:00:01Z",
                "ACTIVE",
                &["1:80"],
                header_rule("b"),
            ),
            bridge(
                "a",
                "2026-01-01T00:00:02Z",
                "ACTIVE",
                &["1:80", "2:81"],
                header_rule("a"),
            ),
            bridge(
                "d",
                "2026-01-01T00:00:00Z",
                "REQUESTED",
                &["1:80"],
                header_rule("d"),
            ),
            bridge(
                "e",
                "2026-01-01T00:00:00Z",
                "ERROR",
                &["1:80"],
                header_rule("e"),
            ),
        ];
        let (table, skipped) = RouteTable::build(&objects);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(names(&table, 80), ["b", "a", "c"]);
        assert_eq!(names(&table, 81), ["a"]);
        assert_eq!(table.ports().collect::<Vec<_>>(), [80, 81]);
        assert_eq!(table.bridge_count(), 3);
        assert_eq!(&*table.routes(81)[0].preamble, b"GEFYRA-BRIDGE/1 a 81\n");
        assert_eq!(table.routes(81)[0].local_port, 2);
    }

    #[test]
    fn the_mode_follows_the_bridges_of_the_port() {
        let objects = [
            bridge(
                "rules",
                "2026-01-01T00:00:00Z",
                "ACTIVE",
                &["1:80", "1:81"],
                header_rule("x"),
            ),
            bridge(
                "all",
                "2026-01-01T00:00:01Z",
                "ACTIVE",
                &["1:81"],
                json!(null),
            ),
            bridge(
                "all2",
                "2026-01-01T00:00:02Z",
                "ACTIVE",
                &["1:81"],
                json!({"rules": []}),
            ),
        ];
        let (table, _) = RouteTable::build(&objects);
        assert!(matches!(table.mode(79), Mode::Original));
        assert!(matches!(table.mode(80), Mode::Http));
        // A rule-less bridge takes the whole port, the oldest of them when several.
        assert!(matches!(table.mode(81), Mode::BridgeRaw(route) if &*route.bridge == "all"));
    }

    #[test]
    fn requests_go_to_the_first_bridge_whose_rules_match() {
        let objects = [
            bridge(
                "old",
                "2026-01-01T00:00:00Z",
                "ACTIVE",
                &["1:80"],
                header_rule("dev"),
            ),
            bridge(
                "new",
                "2026-01-01T00:00:01Z",
                "ACTIVE",
                &["1:80"],
                json!({"rules": [
                    {"match": [{"matchHeader": {"name": "x-gefyra", "value": "dev"}}]},
                    {"match": [{"matchPath": {"path": "/new", "type": "prefix"}}]},
                ]}),
            ),
        ];
        let (table, _) = RouteTable::build(&objects);
        let headers = |value: &'static str| move || [("x-gefyra", value.as_bytes())].into_iter();
        let to = |route: Option<&Arc<Route>>| route.map(|route| route.bridge.to_string());
        assert_eq!(to(table.route(80, "/", headers("dev"))), Some("old".into()));
        assert_eq!(
            to(table.route(80, "/new", headers("other"))),
            Some("new".into())
        );
        assert_eq!(to(table.route(80, "/", headers("other"))), None);
        assert_eq!(
            to(table.route(81, "/new", headers("dev"))),
            None,
            "another port"
        );
    }

    #[test]
    fn unroutable_bridges_are_skipped_with_the_reason() {
        let objects = [
            bridge(
                "bad-rules",
                "2026-01-01T00:00:00Z",
                "ACTIVE",
                &["1:80"],
                json!({"rules": [{"match": [{"matchPath": {"path": "(", "type": "regex"}}]}]}),
            ),
            bridge(
                "bad-ports",
                "2026-01-01T00:00:00Z",
                "ACTIVE",
                &["80"],
                json!(null),
            ),
            bridge(
                "no-ports",
                "2026-01-01T00:00:00Z",
                "ACTIVE",
                &[],
                json!(null),
            ),
            bridge(
                "good",
                "2026-01-01T00:00:00Z",
                "ACTIVE",
                &["1:80"],
                header_rule("x"),
            ),
        ];
        let mut not_strings = bridge(
            "not-strings",
            "2026-01-01T00:00:00Z",
            "ACTIVE",
            &[],
            json!(null),
        );
        not_strings.data["portMappings"] = json!([80]);
        let mut absent = bridge("absent", "2026-01-01T00:00:00Z", "ACTIVE", &[], json!(null));
        absent
            .data
            .as_object_mut()
            .expect("object")
            .remove("portMappings");
        let (table, skipped) = RouteTable::build(objects.iter().chain([&not_strings, &absent]));
        assert_eq!(names(&table, 80), ["good"]);
        let reasons: Vec<(&str, &str)> = skipped
            .iter()
            .map(|skip| (skip.bridge.as_str(), skip.reason.as_str()))
            .collect();
        assert_eq!(reasons.len(), 5, "{reasons:?}");
        for (name, start) in [
            (
                "bad-rules",
                "providerParameter.rules[0].match[0].matchPath.path: the regex does not compile",
            ),
            ("bad-ports", "portMappings[0]: must be"),
            ("no-ports", "portMappings: at least one"),
            ("not-strings", "portMappings: every entry must be a string"),
            ("absent", "portMappings: must be a list"),
        ] {
            assert!(
                reasons
                    .iter()
                    .any(|(n, reason)| *n == name && reason.starts_with(start)),
                "{name}: {reasons:?}"
            );
        }
    }
}
