//! Leader election on a coordination.k8s.io Lease, by `kube-lease-manager`: the API server
//! decides who holds it (server-side apply with conflict detection, a clock-skew grace).
//! What this module adds: a standby watches the Lease and tries at once when the leader
//! releases it (on SIGTERM), instead of sleeping until the old lease would have expired.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use kube_lease_manager::{LeaseCreateMode, LeaseManager, LeaseParams};
use tracing::{info, warn};

/// How the Lease is held: its duration and how long before its expiry the holder renews.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    pub duration: Duration,
    pub renew_before: Duration,
}

impl LeaseTiming {
    /// Refuses timings the lease manager cannot work with (whole seconds, renewal strictly
    /// inside the lease), naming the flags to change.
    pub fn new(duration_seconds: u64, renew_before_seconds: u64) -> Result<Self, String> {
        if duration_seconds == 0 || renew_before_seconds == 0 {
            return Err(
                "--lease-duration-seconds and --lease-renew-before-seconds must be at least 1"
                    .into(),
            );
        }
        if renew_before_seconds >= duration_seconds {
            return Err(format!(
                "--lease-renew-before-seconds ({renew_before_seconds}) must be less than --lease-duration-seconds ({duration_seconds})"
            ));
        }
        Ok(Self {
            duration: Duration::from_secs(duration_seconds),
            renew_before: Duration::from_secs(renew_before_seconds),
        })
    }
}

pub struct LeaderElection {
    /// Renews with short timeouts (see [`LeaderElection::new`]).
    client: Client,
    /// Watches the Lease (a long-lived request).
    watch_client: Client,
    namespace: String,
    name: String,
    identity: String,
    timing: LeaseTiming,
}

impl LeaderElection {
    /// `client` should time out its requests well within `timing.renew_before`, so that a
    /// renewal that hangs cannot outlive the lease.
    pub fn new(
        client: Client,
        watch_client: Client,
        namespace: &str,
        name: &str,
        identity: String,
        timing: LeaseTiming,
    ) -> Self {
        Self {
            client,
            watch_client,
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity,
            timing,
        }
    }

    async fn manager(&self) -> kube_lease_manager::Result<LeaseManager> {
        LeaseManager::new(
            self.client.clone(),
            &self.name,
            &self.namespace,
            LeaseParams::new(
                &self.identity,
                self.timing.duration.as_secs(),
                self.timing.renew_before.as_secs(),
            ),
            LeaseCreateMode::AutoCreate,
        )
        .await
    }

    /// Resolves when the Lease is seen without a holder (released) or deleted.
    async fn released(&self) {
        let api: Api<Lease> = Api::namespaced(self.watch_client.clone(), &self.namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut events = watcher(api, config).default_backoff().boxed();
        while let Some(event) = events.next().await {
            let free = match event {
                Ok(watcher::Event::Apply(lease) | watcher::Event::InitApply(lease)) => lease
                    .spec
                    .and_then(|spec| spec.holder_identity)
                    .is_none_or(|holder| holder.is_empty()),
                Ok(watcher::Event::Delete(_)) => true,
                Ok(_) => false,
                Err(error) => {
                    warn!(lease = %self.name, %error, "watching the leader lease failed; retrying");
                    false
                }
            };
            if free {
                return;
            }
        }
    }

    /// Waits until this process holds the lease; returns the manager that holds it.
    pub async fn acquire(&self) -> LeaseManager {
        loop {
            let manager = match self.manager().await {
                Ok(manager) => manager,
                Err(error) => {
                    warn!(lease = %self.name, %error, "reading the leader lease failed; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            };
            tokio::select! {
                changed = manager.changed() => match changed {
                    Ok(true) => {
                        info!(lease = %self.name, identity = %self.identity, "became the leader");
                        return manager;
                    }
                    Ok(false) => {}
                    Err(error) => {
                        warn!(lease = %self.name, %error, "leader election attempt failed; retrying");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                },
                // Released by its holder: look again now, with the Lease as it is.
                () = self.released() => {}
            }
        }
    }

    /// Renews the lease (by `manager`, which holds it) until it is lost or cannot be renewed
    /// before it would expire; returns then, and the caller must stop reconciling.
    pub async fn keep(&self, manager: &LeaseManager) {
        let mut failing_since: Option<tokio::time::Instant> = None;
        loop {
            match manager.changed().await {
                Ok(false) => {
                    warn!(lease = %self.name, "the lease was taken by another process");
                    return;
                }
                Ok(true) => failing_since = None,
                Err(error) => {
                    let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                    warn!(lease = %self.name, %error, "renewing the lease failed");
                    // Stop before the lease can expire in another process's eyes.
                    if since.elapsed() + Duration::from_secs(1) >= self.timing.renew_before {
                        warn!(lease = %self.name, "could not renew the lease in time");
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Gives the lease up (on shutdown), so that a standby takes over at once.
    pub async fn release(&self, manager: &LeaseManager) {
        match manager.release().await {
            Ok(()) => {
                info!(lease = %self.name, identity = %self.identity, "released the leader lease")
            }
            Err(error) => {
                warn!(lease = %self.name, %error, "releasing the leader lease failed; a standby takes over when it expires")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_the_lease_manager_cannot_hold_are_refused_with_the_flags_named() {
        assert!(LeaseTiming::new(15, 5).is_ok());
        for (duration, renew_before) in [(0, 1), (15, 0), (5, 5), (5, 9)] {
            let error = LeaseTiming::new(duration, renew_before).unwrap_err();
            assert!(error.contains("--lease-"), "{error}");
        }
    }
}
