//! What `clients list` and `clients inspect` print: pure views of GefyraClients and Events,
//! rendered as a table (text), JSON or YAML (the table, the ages and the escaping are the
//! bridge and mount lists' too). No credentials or keys ever appear.

use std::io::Write as _;

use gefyra_api::connection::{ProviderConfig, ProviderParameter};
use gefyra_api::{ClientState, GefyraClient};
use k8s_openapi::api::core::v1::Event;
use kube::ResourceExt;
use serde::Serialize;
use serde_json::Value;

use crate::args::OutputFormat;

/// One line of `clients list`.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ClientRow {
    pub client_id: String,
    pub state: String,
    /// The client's tunnel address while connected.
    pub address: Option<String>,
    pub subnet: Option<String>,
    pub created: Option<String>,
    pub wireguard_handshake: Option<String>,
    /// Why the client is in state ERROR (or not ready).
    pub message: Option<String>,
    /// The reason of its Ready condition (`-o wide`).
    pub reason: Option<String>,
    /// When it is deleted (RFC 3339).
    pub sunset: Option<String>,
}

/// The client's `providerConfig`, if it is one (what does not parse is not shown).
fn config_of(client: &GefyraClient) -> Option<ProviderConfig> {
    ProviderConfig::parse(client.provider_config.as_ref()?).ok()
}

fn text_at(map: Option<&serde_json::Map<String, Value>>, key: &str) -> Option<String> {
    map?.get(key)?.as_str().map(str::to_string)
}

impl ClientRow {
    pub fn of(client: &GefyraClient) -> Self {
        let ready = client.ready_condition();
        Self {
            client_id: client.name_any(),
            state: client.state.to_string(),
            address: config_of(client).map(|config| config.address.to_string()),
            subnet: client
                .provider_parameter
                .as_ref()
                .and_then(|parameter| ProviderParameter::parse(parameter).ok())
                .and_then(|parameter| parameter.subnet)
                .map(|subnet| subnet.to_string()),
            created: client
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|time| time.0.to_string()),
            wireguard_handshake: text_at(
                client
                    .status
                    .as_ref()
                    .and_then(|status| status.wireguard.as_ref()),
                "latest_handshake",
            ),
            message: ready
                .filter(|condition| condition.status != "True" && !condition.message.is_empty())
                .map(|condition| condition.message.clone()),
            reason: ready
                .filter(|condition| !condition.reason.is_empty())
                .map(|condition| condition.reason.clone()),
            sunset: client.sunset.clone(),
        }
    }
}

/// A value from the cluster as it may be shown on a terminal: control characters (escape
/// sequences, line breaks, tabs) are escaped, so a hostile name or message cannot move the
/// cursor, recolour the screen or forge a line of output.
pub fn printable(value: &str) -> String {
    if !value.chars().any(char::is_control) {
        return value.to_string();
    }
    value
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Columns aligned as kubectl aligns them (three spaces apart); no header line when
/// `header` is empty.
fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut writer = tabwriter::TabWriter::new(Vec::new()).padding(3);
    let mut line = |cells: &[String]| {
        // Writing to memory cannot fail.
        let cells: Vec<String> = cells.iter().map(|cell| printable(cell)).collect();
        let _ = writeln!(writer, "{}", cells.join("\t"));
    };
    if !header.is_empty() {
        line(
            &header
                .iter()
                .map(|cell| cell.to_string())
                .collect::<Vec<_>>(),
        );
    }
    for row in rows {
        line(&row);
    }
    let bytes = writer.into_inner().unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

pub(crate) fn or_dash(value: &Option<String>) -> String {
    value.clone().unwrap_or_else(|| "-".into())
}

/// How `kubectl get -o name` names an object of `kind` (`gefyraclient`).
fn resource_name(kind: &str, name: &str) -> String {
    format!("{kind}.gefyra.dev/{}\n", printable(name))
}

/// The age of something created at `then`, seen at `now`, as kubectl's AGE column shows
/// it (k8s.io/apimachinery's `HumanDuration`): seconds up to two minutes, then minutes with
/// seconds below ten minutes, hours with minutes below eight hours, days with hours below
/// eight days, years with days below eight years. A time up to a second ahead (clock skew)
/// is `0s`; further ahead is `<invalid>`.
pub fn human_age(then: jiff::Timestamp, now: jiff::Timestamp) -> String {
    let seconds = now.as_second().saturating_sub(then.as_second());
    if seconds < -1 {
        return "<invalid>".into();
    }
    if seconds < 0 {
        return "0s".into();
    }
    if seconds < 120 {
        return format!("{seconds}s");
    }
    let with = |big: i64, big_unit: &str, small: i64, small_unit: &str| {
        if small == 0 {
            format!("{big}{big_unit}")
        } else {
            format!("{big}{big_unit}{small}{small_unit}")
        }
    };
    let minutes = seconds / 60;
    if minutes < 10 {
        return with(minutes, "m", seconds % 60, "s");
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        return with(hours, "h", minutes % 60, "m");
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    let days = hours / 24;
    if hours < 24 * 8 {
        return with(days, "d", hours % 24, "h");
    }
    if hours < 24 * 365 * 2 {
        return format!("{days}d");
    }
    if hours < 24 * 365 * 8 {
        return with(days / 365, "y", days % 365, "d");
    }
    format!("{}y", days / 365)
}

/// How a table is printed: the time ages are measured against, and whether the header
/// line is shown (`--no-headers`).
#[derive(Debug, Clone, Copy)]
pub struct TableView {
    pub now: jiff::Timestamp,
    pub headers: bool,
}

impl TableView {
    pub fn now() -> Self {
        Self {
            now: jiff::Timestamp::now(),
            headers: true,
        }
    }

    /// The AGE cell of something created at `created` (RFC 3339); `-` if unknown.
    pub fn age(&self, created: Option<&str>) -> String {
        created
            .and_then(|created| created.parse::<jiff::Timestamp>().ok())
            .map_or_else(|| "-".to_string(), |created| human_age(created, self.now))
    }
}

/// A line of a list (`clients list`, `mount list`, `bridge list`).
pub trait ListRow: Serialize {
    /// The kind `-o name` prints (`gefyraclient`).
    const KIND: &'static str;
    /// The table's columns, and those `-o wide` adds.
    const COLUMNS: &'static [&'static str];
    const WIDE_COLUMNS: &'static [&'static str];
    fn name(&self) -> &str;
    /// The table's cells, the wide ones too when `wide`.
    fn cells(&self, wide: bool, view: &TableView) -> Vec<String>;
}

/// A list as `-o` asks: a table (kubectl's alignment, `-o wide` with more columns), the
/// names as `kubectl get -o name` prints them, or the rows as JSON or YAML.
pub fn list<R: ListRow>(rows: &[R], format: OutputFormat, view: TableView) -> String {
    let wide = format == OutputFormat::Wide;
    match format {
        OutputFormat::Table | OutputFormat::Wide => {
            let mut header = R::COLUMNS.to_vec();
            if wide {
                header.extend(R::WIDE_COLUMNS);
            }
            if !view.headers {
                header.clear();
            }
            table(&header, rows.iter().map(|row| row.cells(wide, &view)))
        }
        OutputFormat::Name => rows
            .iter()
            .map(|row| resource_name(R::KIND, row.name()))
            .collect(),
        OutputFormat::Json | OutputFormat::Yaml => structured(&rows, format),
    }
}

fn structured<T: Serialize>(value: &T, format: OutputFormat) -> String {
    match format {
        OutputFormat::Yaml => serde_saphyr::to_string(value).expect("views serialize to YAML"),
        _ => {
            let mut text = serde_json::to_string_pretty(value).expect("views serialize to JSON");
            text.push('\n');
            text
        }
    }
}

/// `clients list` output; `-o wide` adds the Ready condition's reason and the sunset.
pub fn client_list(rows: &[ClientRow], format: OutputFormat, view: TableView) -> String {
    list(rows, format, view)
}

impl ListRow for ClientRow {
    const KIND: &'static str = gefyra_api::client::KIND;
    const COLUMNS: &'static [&'static str] =
        &["ID", "STATE", "ADDRESS", "AGE", "WIREGUARD HANDSHAKE"];
    const WIDE_COLUMNS: &'static [&'static str] = &["REASON", "SUNSET"];

    fn name(&self) -> &str {
        &self.client_id
    }

    fn cells(&self, wide: bool, view: &TableView) -> Vec<String> {
        let mut cells = vec![
            self.client_id.clone(),
            self.state.clone(),
            or_dash(&self.address),
            view.age(self.created.as_deref()),
            or_dash(&self.wireguard_handshake),
        ];
        if wide {
            cells.extend([or_dash(&self.reason), or_dash(&self.sunset)]);
        }
        cells
    }
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub state: String,
    pub at: String,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub status: String,
    pub reason: String,
    pub message: String,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Connection {
    pub address: Option<String>,
    pub subnet: Option<String>,
    /// The client's WireGuard public key.
    pub public_key: Option<String>,
    /// Where the client sends its WireGuard traffic, as the operator configured it.
    pub server_endpoint: Option<String>,
    /// `status.wireguard` as Stowaway wrote it (handshake, transfer, the peer's endpoint).
    pub wireguard: Option<Value>,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct EventLine {
    pub time: Option<String>,
    #[serde(rename = "type")]
    pub type_: String,
    pub reason: String,
    pub message: String,
    pub count: i32,
}

impl EventLine {
    pub fn of(event: &Event) -> Self {
        let time = event
            .last_timestamp
            .as_ref()
            .map(|time| time.0.to_string())
            .or_else(|| event.event_time.as_ref().map(|time| time.0.to_string()))
            .or_else(|| {
                event
                    .first_timestamp
                    .as_ref()
                    .map(|time| time.0.to_string())
            });
        Self {
            time,
            type_: event.type_.clone().unwrap_or_default(),
            reason: event.reason.clone().unwrap_or_default(),
            message: event.message.clone().unwrap_or_default(),
            count: event
                .series
                .as_ref()
                .and_then(|series| series.count)
                .or(event.count)
                .unwrap_or(1),
        }
    }
}

/// `clients inspect` output.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Inspection {
    pub client_id: String,
    pub namespace: String,
    pub uid: Option<String>,
    pub state: String,
    pub ready: Option<Readiness>,
    pub created: Option<String>,
    pub credentials_expire_at: Option<String>,
    pub sunset: Option<String>,
    pub max_connection_age: Option<i64>,
    /// Oldest first.
    pub state_transitions: Vec<Transition>,
    pub connection: Option<Connection>,
    /// Oldest first; `None` when the Events could not be read.
    pub events: Option<Vec<EventLine>>,
}

impl Inspection {
    pub fn of(client: &GefyraClient, events: Option<&[Event]>) -> Self {
        let row = ClientRow::of(client);
        let mut state_transitions: Vec<Transition> = client
            .state_transitions
            .iter()
            .map(|(state, at)| Transition {
                state: state.clone(),
                at: at.clone(),
            })
            .collect();
        // Oldest first; states entered in the same second in lifecycle order.
        let order = |state: &str| serde_json::from_value::<ClientState>(state.into()).ok();
        state_transitions.sort_by(|a, b| {
            (&a.at, order(&a.state).is_none(), order(&a.state)).cmp(&(
                &b.at,
                order(&b.state).is_none(),
                order(&b.state),
            ))
        });
        let wireguard = client
            .status
            .as_ref()
            .and_then(|status| status.wireguard.clone())
            .map(Value::Object);
        let config = config_of(client);
        let connection = (client.provider_parameter.is_some() || client.provider_config.is_some())
            .then(|| Connection {
                address: row.address.clone(),
                subnet: row.subnet.clone(),
                public_key: config.as_ref().map(|config| config.public_key.to_string()),
                server_endpoint: config.as_ref().map(|config| config.endpoint.to_string()),
                wireguard,
            });
        let events = events.map(|events| {
            let mut lines: Vec<EventLine> = events.iter().map(EventLine::of).collect();
            lines.sort_by(|a, b| a.time.cmp(&b.time));
            lines
        });
        Self {
            client_id: row.client_id,
            namespace: client.namespace().unwrap_or_default(),
            uid: client.metadata.uid.clone(),
            state: row.state,
            ready: client.ready_condition().map(|condition| Readiness {
                status: condition.status.clone(),
                reason: condition.reason.clone(),
                message: condition.message.clone(),
            }),
            created: row.created,
            credentials_expire_at: client
                .status
                .as_ref()
                .and_then(|status| status.credentials_expire_at.clone()),
            sunset: client.sunset.clone(),
            max_connection_age: client.max_connection_age,
            state_transitions,
            connection,
            events,
        }
    }

    pub fn render(&self, format: OutputFormat) -> String {
        match format {
            OutputFormat::Table | OutputFormat::Wide => {}
            OutputFormat::Name => return resource_name(gefyra_api::client::KIND, &self.client_id),
            OutputFormat::Json | OutputFormat::Yaml => return structured(self, format),
        }
        let mut fields: Vec<(&str, String)> = vec![
            ("Client", self.client_id.clone()),
            ("Namespace", self.namespace.clone()),
            ("UID", or_dash(&self.uid)),
            ("State", self.state.clone()),
        ];
        if let Some(ready) = &self.ready {
            let mut text = format!("{} ({})", ready.status, ready.reason);
            if !ready.message.is_empty() {
                text.push_str(&format!(": {}", ready.message));
            }
            fields.push(("Ready", text));
        }
        fields.push(("Created", or_dash(&self.created)));
        fields.push(("Credentials expire", or_dash(&self.credentials_expire_at)));
        if let Some(sunset) = &self.sunset {
            fields.push(("Sunset", sunset.clone()));
        }
        if let Some(age) = self.max_connection_age {
            fields.push(("Max connection age", format!("{age}s")));
        }
        let mut text = String::new();
        let width = fields.iter().map(|(name, _)| name.len()).max().unwrap_or(0) + 2;
        for (name, value) in &fields {
            let value = printable(value);
            text.push_str(&format!("{:width$}{value}\n", format!("{name}:")));
        }
        text.push_str("\nState transitions:\n");
        for transition in &self.state_transitions {
            text.push_str(&format!(
                "  {:<12}{}\n",
                printable(&transition.state),
                printable(&transition.at)
            ));
        }
        if let Some(connection) = &self.connection {
            text.push_str("\nConnection:\n");
            let wireguard = connection.wireguard.as_ref();
            let at = |key: &str| {
                wireguard
                    .and_then(|w| w.pointer(key))
                    .map(|v| v.to_string().trim_matches('"').to_string())
            };
            let lines = [
                ("Address", connection.address.clone()),
                ("Subnet", connection.subnet.clone()),
                ("Public key", connection.public_key.clone()),
                ("Server endpoint", connection.server_endpoint.clone()),
                ("Latest handshake", at("/latest_handshake")),
                (
                    "Received",
                    at("/transfer/received").map(|bytes| format!("{bytes} bytes")),
                ),
                (
                    "Sent",
                    at("/transfer/sent").map(|bytes| format!("{bytes} bytes")),
                ),
                (
                    "Peer endpoint",
                    at("/endpoint/host")
                        .map(|host| format!("{host}:{}", at("/endpoint/port").unwrap_or_default())),
                ),
            ];
            for (name, value) in lines {
                if let Some(value) = value {
                    let value = printable(&value);
                    text.push_str(&format!("  {:18}{value}\n", format!("{name}:")));
                }
            }
        }
        text.push_str("\nEvents:\n");
        match &self.events {
            None => text.push_str("  (the Events could not be read)\n"),
            Some(events) if events.is_empty() => text.push_str("  none\n"),
            Some(events) => {
                let rows = events.iter().map(|event| {
                    vec![
                        or_dash(&event.time),
                        event.type_.clone(),
                        event.reason.clone(),
                        if event.count > 1 {
                            format!("{} (x{})", event.message, event.count)
                        } else {
                            event.message.clone()
                        },
                    ]
                });
                for line in table(&["TIME", "TYPE", "REASON", "MESSAGE"], rows).lines() {
                    text.push_str(&format!("  {}\n", line.trim_end()));
                }
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_never_reach_the_terminal() {
        assert_eq!(printable("plain"), "plain");
        assert_eq!(printable("a\u{1b}[2Jb\nc\td"), "a\\u{1b}[2Jb\\nc\\td");
        let table = table(&["A"], [vec!["x\ny".to_string()]]);
        assert_eq!(table.lines().count(), 2, "{table}");
    }

    #[test]
    fn ages_read_like_kubectls() {
        let now: jiff::Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let age = |seconds: i64| human_age(now - jiff::SignedDuration::from_secs(seconds), now);
        for (seconds, expected) in [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (59, "59s"),
            (119, "119s"),
            (120, "2m"),
            (125, "2m5s"),
            (599, "9m59s"),
            (600, "10m"),
            (179 * 60 + 59, "179m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 5 * 60 + 9, "3h5m"),
            (8 * 3600, "8h"),
            (47 * 3600 + 59 * 60, "47h"),
            (48 * 3600, "2d"),
            (7 * 86400 + 23 * 3600, "7d23h"),
            (8 * 86400, "8d"),
            (729 * 86400, "729d"),
            (730 * 86400, "2y"),
            (731 * 86400, "2y1d"),
            (8 * 365 * 86400, "8y"),
            (100 * 365 * 86400 + 86400, "100y"),
        ] {
            assert_eq!(age(seconds), expected, "{seconds} s");
        }
    }

    #[test]
    fn list_without_headers_and_by_name() {
        let view = TableView {
            now: "2026-11-23T10:00:00Z".parse().unwrap(),
            headers: false,
        };
        let row = ClientRow {
            client_id: "anna".into(),
            state: "WAITING".into(),
            address: None,
            subnet: None,
            created: Some("2026-11-23T09:59:00Z".into()),
            wireguard_handshake: None,
            message: None,
            reason: Some("CredentialsReady".into()),
            sunset: Some("2026-12-24T18:00:00Z".into()),
        };
        let rows = [row];
        assert_eq!(
            client_list(&rows, OutputFormat::Table, view),
            "anna   WAITING   -    60s   -\n"
        );
        assert_eq!(
            client_list(&rows, OutputFormat::Wide, view),
            "anna   WAITING   -    60s   -    CredentialsReady   2026-12-24T18:00:00Z\n"
        );
        let with_headers = TableView {
            headers: true,
            ..view
        };
        assert!(
            client_list(&rows, OutputFormat::Wide, with_headers).starts_with(
                "ID     STATE     ADDRESS   AGE   WIREGUARD HANDSHAKE   REASON             SUNSET\n"
            )
        );
        assert_eq!(
            client_list(&rows, OutputFormat::Name, view),
            "gefyraclient.gefyra.dev/anna\n"
        );
    }
}
