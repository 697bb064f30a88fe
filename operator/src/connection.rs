//! Connecting a client: what it asked for (`providerParameter`), the `providerConfig` the
//! operator publishes, and when a connection must end. Pure functions; the controller does
//! the I/O. The wire contract itself is `gefyra_api::connection`.

use gefyra_api::connection::{Endpoint, ProviderConfig, WireGuardKey};
use gefyra_api::ipam::Allocation;
pub use gefyra_api::wireguard::{
    KeyPair, generate_key_pair, generate_preshared_key, public_key_of,
};
use jiff::{SignedDuration, Timestamp};

/// Whether a stored `providerConfig` (as read back, if it parses) still describes
/// `allocation` and a request for `public_key` (`None`: the operator generates the key
/// pair). Then it is kept as it is: reconnecting peers keep their keys.
pub fn config_matches(
    config: Option<&ProviderConfig>,
    allocation: &Allocation,
    public_key: Option<WireGuardKey>,
) -> bool {
    let Some(config) = config else {
        return false;
    };
    let key_ok = match public_key {
        Some(public) => config.public_key == public && config.private_key.is_none(),
        None => config
            .private_key
            .and_then(|private| public_key_of(&private.to_string()))
            .is_some_and(|public| public == config.public_key.to_string()),
    };
    config.address == allocation.tunnel.addr() && key_ok
}

/// Which of `holders` — other clients that hold the public key a client asks for, each
/// as (since when it holds its tunnel address, name) — keeps the key rather than the asking
/// client `own`: the first to have connected (names break ties). A holder whose claim is
/// not seen yet never wins over an asking client whose claim is; an asking client without
/// a claim loses to any holder.
pub fn first_holder(
    own: (Option<Timestamp>, String),
    holders: impl IntoIterator<Item = (Option<Timestamp>, String)>,
) -> Option<String> {
    holders
        .into_iter()
        .find(|(since, name)| match (since, &own.0) {
            (_, None) => true,
            (Some(theirs), Some(ours)) => (theirs, name) < (ours, &own.1),
            (None, Some(_)) => false,
        })
        .map(|(_, name)| name)
}

/// A fresh `providerConfig` for `allocation`: the client's public key (and private key if
/// the operator generated the pair), the server's key, a new pre-shared key. No cluster
/// ranges: the caller sets them (`gefyra_api::connection::cluster_ranges` of its pool).
pub fn new_config(
    allocation: &Allocation,
    client_public: WireGuardKey,
    client_private: Option<WireGuardKey>,
    server_public: WireGuardKey,
    endpoint: &Endpoint,
) -> ProviderConfig {
    let preshared: WireGuardKey = generate_preshared_key()
        .parse()
        .expect("a generated key is a key");
    ProviderConfig::new(
        allocation.tunnel.addr(),
        client_public,
        client_private,
        server_public,
        preshared,
        endpoint.clone(),
        Vec::new(),
    )
}

/// When a connection made at `since` reaches `max_age`; `Err` names the value that cannot
/// be added (never a panic, whatever an admin or a client wrote).
pub fn connection_due(
    max_age_seconds: Option<i64>,
    default_max_age: Option<SignedDuration>,
    since: Timestamp,
) -> Result<Option<Timestamp>, String> {
    let age = match max_age_seconds {
        Some(seconds) if seconds <= 0 => {
            return Err(format!(
                "maxConnectionAge {seconds} is not a positive number of seconds"
            ));
        }
        Some(seconds) => SignedDuration::from_secs(seconds),
        None => match default_max_age {
            Some(age) => age,
            None => return Ok(None),
        },
    };
    since.checked_add(age).map(Some).map_err(|_| {
        format!(
            "maxConnectionAge {}s after {since} is beyond the last representable time",
            age.as_secs()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_first_to_connect_keeps_a_key() {
        let at = |second: i64| Some(Timestamp::from_second(second).unwrap());
        let named = |since, name: &str| (since, name.to_string());
        // An earlier holder keeps it; a later one does not.
        assert_eq!(
            first_holder(named(at(10), "b"), [named(at(20), "c"), named(at(5), "a")]),
            Some("a".into())
        );
        assert_eq!(first_holder(named(at(10), "b"), [named(at(20), "c")]), None);
        // Claimed at the same second: the name decides, both ways the same.
        assert_eq!(
            first_holder(named(at(10), "b"), [named(at(10), "a")]),
            Some("a".into())
        );
        assert_eq!(first_holder(named(at(10), "a"), [named(at(10), "b")]), None);
        // Without a claim of its own the asking client loses; a holder without one does not win.
        assert_eq!(
            first_holder(named(None, "a"), [named(None, "z")]),
            Some("z".into())
        );
        assert_eq!(first_holder(named(at(10), "b"), [named(None, "a")]), None);
        assert_eq!(first_holder(named(None, "a"), []), None);
    }

    fn allocation() -> Allocation {
        Allocation {
            uid: "u".into(),
            tunnel: "192.168.96.2/32".parse().unwrap(),
            routed: None,
        }
    }

    fn key(text: &str) -> WireGuardKey {
        text.parse().unwrap()
    }

    #[test]
    fn configs_are_kept_only_while_they_describe_the_allocation_and_the_key() {
        let server = key(&generate_key_pair().public);
        let client = generate_key_pair();
        let endpoint: Endpoint = "203.0.113.7:31820".parse().unwrap();
        let allocation = allocation();
        let generated = new_config(
            &allocation,
            key(&client.public),
            Some(key(&client.private)),
            server,
            &endpoint,
        );
        assert_eq!(generated.address.to_string(), "192.168.96.2");
        assert!(config_matches(Some(&generated), &allocation, None));
        assert!(!config_matches(
            Some(&generated),
            &allocation,
            Some(key(&client.public))
        ));
        let own = new_config(&allocation, key(&client.public), None, server, &endpoint);
        assert!(config_matches(
            Some(&own),
            &allocation,
            Some(key(&client.public))
        ));
        assert!(!config_matches(Some(&own), &allocation, None));
        let elsewhere = Allocation {
            tunnel: "192.168.96.3/32".parse().unwrap(),
            ..allocation.clone()
        };
        assert!(!config_matches(
            Some(&own),
            &elsewhere,
            Some(key(&client.public))
        ));
        assert!(!config_matches(None, &allocation, None));
    }

    #[test]
    fn connections_end_at_their_max_age() {
        let since: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(
            connection_due(Some(60), None, since),
            Ok(Some("2026-01-01T00:01:00Z".parse().unwrap()))
        );
        assert_eq!(
            connection_due(None, Some(SignedDuration::from_secs(120)), since),
            Ok(Some("2026-01-01T00:02:00Z".parse().unwrap()))
        );
        assert_eq!(connection_due(None, None, since), Ok(None));
        assert!(connection_due(Some(0), None, since).is_err());
        let last = Timestamp::MAX;
        assert!(
            connection_due(Some(1), None, last)
                .unwrap_err()
                .contains("beyond")
        );
    }

    proptest! {
        /// Any age and any start time: a time or a reason, never a panic.
        #[test]
        fn hostile_ages_never_panic(seconds in any::<i64>(), default in any::<i64>(), since in any::<i64>()) {
            let since = Timestamp::from_second(since.clamp(Timestamp::MIN.as_second(), Timestamp::MAX.as_second())).unwrap();
            let default = Some(SignedDuration::from_secs(default));
            let _ = connection_due(Some(seconds), default, since);
            let _ = connection_due(None, default, since);
        }
    }
}
