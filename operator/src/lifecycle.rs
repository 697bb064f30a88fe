//! How state changes are recorded, exactly as Gefyra records them: `state` plus
//! `stateTransitions[STATE] = <UTC time with microseconds>Z`.

use gefyra_api::ClientState;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::{Value, json};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
