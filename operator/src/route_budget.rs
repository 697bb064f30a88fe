//! How often one client may change its routed range. Each change reads and writes every
//! route shard its old and new range cover (up to 2 × [`MAX_SHARDS_PER_ROUTE`] ConfigMaps),
//! and a client's own token may patch `providerParameter.subnet` as often as the API server
//! lets it: without a budget, one client's loop of patches is a loop of the operator's
//! writes. This only meters cost; who holds a range is still decided by the API server.
//!
//! A generic cell-rate algorithm: each client has a "theoretical arrival time"; a change
//! moves it on by one interval, and is refused while it is more than a burst ahead of now.
//!
//! [`MAX_SHARDS_PER_ROUTE`]: gefyra_api::route_shards::MAX_SHARDS_PER_ROUTE

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Route changes a client may make at once.
pub const BURST: u32 = 5;
/// Then one more every this long: 5 a minute.
pub const INTERVAL: Duration = Duration::from_secs(12);

/// What each client has spent of its route-change budget.
pub struct RouteBudget {
    burst: u32,
    interval: Duration,
    due: Mutex<Due>,
}

/// By client uid: when its budget is whole again. Clients whose budget is whole are
/// dropped once the map doubles since the last time (amortized: no scan per change).
#[derive(Default)]
struct Due {
    by_client: HashMap<String, Instant>,
    prune_at: usize,
}

const MIN_PRUNE_AT: usize = 1024;

impl Default for RouteBudget {
    fn default() -> Self {
        Self::new(BURST, INTERVAL)
    }
}

impl RouteBudget {
    pub fn new(burst: u32, interval: Duration) -> Self {
        Self {
            burst: burst.max(1),
            interval,
            due: Mutex::default(),
        }
    }

    /// Spends one change of client `uid` at `now`, or says how long until it may.
    pub fn spend(&self, uid: &str, now: Instant) -> Result<(), Duration> {
        let mut due = self.due.lock().unwrap_or_else(|e| e.into_inner());
        let at = due.by_client.get(uid).copied().unwrap_or(now).max(now);
        let allowance = self.interval.saturating_mul(self.burst - 1);
        let ahead = at - now;
        if ahead > allowance {
            return Err(ahead - allowance);
        }
        if due.by_client.len() >= due.prune_at.max(MIN_PRUNE_AT) {
            due.by_client.retain(|_, whole_at| *whole_at > now);
            due.prune_at = due.by_client.len().saturating_mul(2);
        }
        due.by_client.insert(uid.to_string(), at + self.interval);
        Ok(())
    }

    /// Forgets a deleted client.
    pub fn forget(&self, uid: &str) {
        self.due
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_client
            .remove(uid);
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.due.lock().unwrap().by_client.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_change_per_interval() {
        let budget = RouteBudget::new(3, Duration::from_secs(10));
        let start = Instant::now();
        for _ in 0..3 {
            budget.spend("a", start).unwrap();
        }
        assert_eq!(budget.spend("a", start), Err(Duration::from_secs(10)));
        assert_eq!(
            budget.spend("a", start + Duration::from_secs(4)),
            Err(Duration::from_secs(6))
        );
        budget.spend("a", start + Duration::from_secs(10)).unwrap();
        assert!(budget.spend("a", start + Duration::from_secs(10)).is_err());
        // Another client's budget is its own.
        budget.spend("b", start).unwrap();
        // After a quiet spell the whole burst is back.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            budget.spend("a", later).unwrap();
        }
        assert!(budget.spend("a", later).is_err());
    }

    #[test]
    fn a_hundred_changes_at_once_cost_a_burst_and_idle_clients_are_not_remembered() {
        let budget = RouteBudget::new(5, Duration::from_secs(12));
        let start = Instant::now();
        let spent = (0..100)
            .filter(|_| budget.spend("a", start).is_ok())
            .count();
        assert_eq!(spent, 5);
        for client in 0..3000 {
            budget.spend(&client.to_string(), start).unwrap();
        }
        let later = start + Duration::from_secs(3600);
        for client in 0..3000 {
            budget.spend(&format!("later-{client}"), later).unwrap();
        }
        // The first 3,000 are whole again and forgotten once the map grew.
        assert!(
            budget.remembered() <= 3000 + MIN_PRUNE_AT,
            "{}",
            budget.remembered()
        );
        budget.forget("later-0");
        assert!(budget.spend("later-0", later).is_ok());
    }
}
