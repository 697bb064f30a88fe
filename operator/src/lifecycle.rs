//! The client's lifecycle, pure: what a reconcile does next ([`next`]), decided from the
//! client alone, and how state changes are recorded, exactly as Gefyra records them: `state`
//! plus `stateTransitions[STATE] = <UTC time with microseconds>Z`.

use gefyra_api::{ClientState, GefyraClient};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// What a reconcile of a client (not being deleted) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Its sunset has come: delete it (and nothing else).
    Delete { sunset: Timestamp },
    /// Set it up, or keep it set up, then connect or disconnect it.
    Reconcile(Plan),
}

/// The steps of setting a client up and connecting it, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Its sunset, if it has one (credentials never outlive it; a reconcile is due then).
    pub sunset: Option<Timestamp>,
    /// REQUESTED: enter CREATING before any object is written.
    pub enter_creating: bool,
    /// Enter WAITING once the credentials are issued.
    pub settle: bool,
    pub connection: Connection,
}

/// What happens to the client's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    /// Not connected and not asking to be: nothing.
    Idle,
    /// A connect failed (ERROR) and the client no longer asks: give back the route or claim
    /// it may have recorded first.
    GiveBackFailedConnect,
    /// `providerParameter` is gone: enter DISABLING (unless it is already), release its
    /// ranges, enter WAITING without `providerConfig`.
    Disconnect { enter_disabling: bool },
    /// `providerParameter` is set: from WAITING enter ENABLING first; a retry from ERROR
    /// goes straight to ACTIVE once it succeeds (a client that cannot connect stays in ERROR,
    /// no flapping).
    Connect { enter_enabling: bool },
}

/// What a reconcile does with `client` at `now`. Refused: a sunset that is no time.
pub fn next(client: &GefyraClient, now: Timestamp) -> Result<Step> {
    let sunset = sunset_of(client)?;
    if let Some(sunset) = sunset
        && sunset <= now
    {
        return Ok(Step::Delete { sunset });
    }
    let asks = client.provider_parameter.is_some();
    let settle = match client.state {
        ClientState::Requested | ClientState::Creating => true,
        // A failed connect stays in ERROR until the connection step succeeds.
        ClientState::Error => !asks,
        _ => false,
    };
    let state = if settle {
        ClientState::Waiting
    } else {
        client.state
    };
    let connection = if asks {
        Connection::Connect {
            enter_enabling: state == ClientState::Waiting,
        }
    } else if client.provider_config.is_some()
        || matches!(
            state,
            ClientState::Enabling | ClientState::Active | ClientState::Disabling
        )
    {
        Connection::Disconnect {
            enter_disabling: state != ClientState::Disabling,
        }
    } else if client.state == ClientState::Error {
        Connection::GiveBackFailedConnect
    } else {
        Connection::Idle
    };
    Ok(Step::Reconcile(Plan {
        sunset,
        enter_creating: client.state == ClientState::Requested,
        settle,
        connection,
    }))
}

/// The client's sunset, if it sets one.
pub fn sunset_of(client: &GefyraClient) -> Result<Option<Timestamp>> {
    client
        .sunset
        .as_deref()
        .map(|sunset| {
            sunset
                .parse::<Timestamp>()
                .map_err(|_| Error::InvalidSunset {
                    client: client.name_any(),
                    sunset: sunset.to_string(),
                })
        })
        .transpose()
}

/// Gefyra's timestamp format: `2026-11-22T20:52:00.123456Z`.
pub fn gefyra_time(now: Timestamp) -> String {
    now.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// A merge patch that enters `state` at `now`.
pub fn enter(state: ClientState, now: Timestamp) -> Value {
    json!({ "state": state, "stateTransitions": { state.as_str(): gefyra_time(now) } })
}

/// The `Ready` condition; its transition time moves only when its status does.
pub fn ready_condition(
    previous: Option<&Condition>,
    ready: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ready { "True" } else { "False" };
    let last_transition_time = match previous {
        Some(previous) if previous.status == status => previous.last_transition_time.clone(),
        _ => Time(now),
    };
    Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The Event action for entering `state`: `EnterActive`, `EnterWaiting`, ...
pub(crate) fn enter_action(state: ClientState) -> String {
    let name = state.as_str();
    format!("Enter{}{}", &name[..1], name[1..].to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(
        state: ClientState,
        asks: bool,
        configured: bool,
        sunset: Option<&str>,
    ) -> GefyraClient {
        let mut client: GefyraClient = serde_json::from_value(json!({
            "apiVersion": "gefyra.dev/v1", "kind": "gefyraclient",
            "metadata": {"name": "c", "namespace": "gefyra"},
            "provider": "stowaway",
        }))
        .unwrap();
        client.state = state;
        client.sunset = sunset.map(str::to_string);
        if asks {
            client.provider_parameter = Some(serde_json::Map::new());
        }
        if configured {
            client.provider_config = Some(serde_json::Map::new());
        }
        client
    }

    fn plan(state: ClientState, asks: bool, configured: bool) -> Plan {
        let now: Timestamp = "2026-12-03T00:00:00Z".parse().unwrap();
        match next(&client(state, asks, configured, None), now).unwrap() {
            Step::Reconcile(plan) => plan,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_new_client_is_created_settles_and_connects_if_it_asks() {
        use Connection::*;
        let new = plan(ClientState::Requested, false, false);
        assert!(new.enter_creating && new.settle);
        assert_eq!(new.connection, Idle);
        // Created with providerParameter already set (an admin's manifest).
        let asking = plan(ClientState::Requested, true, false);
        assert_eq!(
            asking.connection,
            Connect {
                enter_enabling: true
            }
        );
        assert!(!plan(ClientState::Creating, false, false).enter_creating);
    }

    #[test]
    fn connection_steps_by_state() {
        use ClientState::*;
        use Connection::*;
        #[rustfmt::skip]
        let cases = [
            (Waiting, false, false, false, Idle),
            (Waiting, true, false, false, Connect { enter_enabling: true }),
            (Enabling, true, false, false, Connect { enter_enabling: false }),
            (Active, true, true, false, Connect { enter_enabling: false }),
            // A failed connect retries from ERROR straight to ACTIVE.
            (Error, true, false, false, Connect { enter_enabling: false }),
            (Active, false, true, false, Disconnect { enter_disabling: true }),
            (Enabling, false, false, false, Disconnect { enter_disabling: true }),
            (Disabling, false, true, false, Disconnect { enter_disabling: false }),
            // ERROR that no longer asks: settles; gives back what a failed connect recorded,
            // or disconnects if it was connected.
            (Error, false, false, true, GiveBackFailedConnect),
            (Error, false, true, true, Disconnect { enter_disabling: true }),
        ];
        for (state, asks, configured, settle, connection) in cases {
            let plan = plan(state, asks, configured);
            assert_eq!(
                (plan.settle, plan.connection),
                (settle, connection),
                "{state:?} asks={asks} configured={configured}"
            );
            assert!(!plan.enter_creating);
        }
    }

    #[test]
    fn a_sunset_reached_deletes_and_a_bad_one_is_refused() {
        let now: Timestamp = "2026-12-03T00:00:00Z".parse().unwrap();
        let past = client(
            ClientState::Active,
            true,
            true,
            Some("2026-12-02T00:00:00Z"),
        );
        assert!(matches!(next(&past, now).unwrap(), Step::Delete { .. }));
        let future = client(
            ClientState::Waiting,
            false,
            false,
            Some("2027-01-01T00:00:00Z"),
        );
        let Step::Reconcile(plan) = next(&future, now).unwrap() else {
            panic!("a future sunset deletes nothing");
        };
        assert_eq!(plan.sunset, Some("2027-01-01T00:00:00Z".parse().unwrap()));
        let bad = client(ClientState::Waiting, false, false, Some("next tuesday"));
        assert!(matches!(next(&bad, now), Err(Error::InvalidSunset { .. })));
    }

    #[test]
    fn transitions_are_recorded_like_gefyra() {
        let now: Timestamp = "2026-11-22T20:52:00.5Z".parse().unwrap();
        assert_eq!(
            enter(ClientState::Waiting, now),
            json!({"state": "WAITING", "stateTransitions": {"WAITING": "2026-11-22T20:52:00.500000Z"}})
        );
    }

    #[test]
    fn ready_transition_time_moves_only_on_a_status_change() {
        let t1: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t2: Timestamp = "2026-01-02T00:00:00Z".parse().unwrap();
        let first = ready_condition(None, false, "Creating", "", Some(1), t1);
        let same = ready_condition(Some(&first), false, "Other", "", Some(2), t2);
        assert_eq!(same.last_transition_time, Time(t1));
        let changed = ready_condition(Some(&same), true, "CredentialsIssued", "", Some(2), t2);
        assert_eq!(changed.last_transition_time, Time(t2));
    }

    #[test]
    fn each_state_entered_is_its_own_event_action() {
        assert_eq!(enter_action(ClientState::Active), "EnterActive");
        let actions: std::collections::BTreeSet<String> =
            ClientState::ALL.into_iter().map(enter_action).collect();
        assert_eq!(actions.len(), ClientState::ALL.len());
    }
}
