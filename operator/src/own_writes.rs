//! What this process's own writes to a client have made stale. A watch delivers a write
//! some time after it returned; a reconcile from a cache that does not show the operator's
//! last write to a client yet would decide again what that write already did (at 10,000
//! connects, 63 clients were patched ACTIVE twice, with a second Event). Such a reconcile
//! waits for the cache instead.
//!
//! Only resource versions this process saw its own writes replace count as stale; anything
//! else — the version its last write made, another writer's — is the cache catching up,
//! and ends the entry. An entry is trusted 60 s at most (a watch that never delivers must
//! not stall a client).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the versions a write replaced count as stale.
const TRUSTED: Duration = Duration::from_secs(60);
/// Versions remembered per client (a reconcile writes a client a few times at most).
const KEPT: usize = 16;

#[derive(Default)]
pub struct OwnWrites {
    /// By client uid.
    clients: Mutex<HashMap<String, Written>>,
}

struct Written {
    /// Versions this process's writes replaced, oldest first.
    replaced: Vec<String>,
    /// The version its last write made.
    latest: Option<String>,
    at: Instant,
}

impl OwnWrites {
    /// Records a write to client `uid` that was based on version `before` and made `after`.
    pub fn wrote(&self, uid: &str, before: Option<&str>, after: Option<&str>) {
        self.wrote_at(uid, before, after, Instant::now());
    }

    fn wrote_at(&self, uid: &str, before: Option<&str>, after: Option<&str>, now: Instant) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let written = clients.entry(uid.to_string()).or_insert_with(|| Written {
            replaced: Vec::new(),
            latest: None,
            at: now,
        });
        let previous = written.latest.take();
        for version in [before.map(str::to_string), previous].into_iter().flatten() {
            if Some(&version) != after.map(str::to_string).as_ref()
                && !written.replaced.contains(&version)
            {
                written.replaced.push(version);
            }
        }
        if written.replaced.len() > KEPT {
            let excess = written.replaced.len() - KEPT;
            written.replaced.drain(..excess);
        }
        written.latest = after.map(str::to_string);
        written.at = now;
    }

    /// Whether a cached client `uid` at `version` predates this process's last write to it
    /// (then its reconcile should wait for the cache). Anything else ends the entry.
    pub fn is_stale(&self, uid: &str, version: Option<&str>) -> bool {
        self.is_stale_at(uid, version, Instant::now())
    }

    fn is_stale_at(&self, uid: &str, version: Option<&str>, now: Instant) -> bool {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let Some(written) = clients.get(uid) else {
            return false;
        };
        let stale = now.saturating_duration_since(written.at) < TRUSTED
            && version.is_some_and(|version| written.replaced.iter().any(|v| v == version));
        if !stale {
            clients.remove(uid);
        }
        stale
    }

    /// Forgets a deleted client.
    pub fn forget(&self, uid: &str) {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_replaced_by_own_writes_are_stale_until_the_cache_catches_up() {
        let writes = OwnWrites::default();
        let start = Instant::now();
        // A connect: ENABLING from version 10 made 11, ACTIVE (from the same view) 12.
        writes.wrote_at("u", Some("10"), Some("11"), start);
        writes.wrote_at("u", Some("10"), Some("12"), start);
        assert!(writes.is_stale_at("u", Some("10"), start));
        assert!(writes.is_stale_at("u", Some("11"), start));
        assert!(!writes.is_stale_at("other", Some("11"), start));
        // The cache shows the last write: caught up, and the entry is gone.
        assert!(!writes.is_stale_at("u", Some("12"), start));
        assert!(!writes.is_stale_at("u", Some("11"), start));
    }

    #[test]
    fn another_writers_version_or_a_minute_ends_the_entry() {
        let writes = OwnWrites::default();
        let start = Instant::now();
        writes.wrote_at("u", Some("10"), Some("11"), start);
        assert!(!writes.is_stale_at("u", Some("15"), start));
        assert!(!writes.is_stale_at("u", Some("10"), start));

        writes.wrote_at("u", Some("20"), Some("21"), start);
        assert!(!writes.is_stale_at("u", Some("20"), start + TRUSTED));
        assert!(!writes.is_stale_at("u", None, start));

        writes.wrote_at("u", Some("30"), Some("31"), start);
        writes.forget("u");
        assert!(!writes.is_stale_at("u", Some("30"), start));
    }

    #[test]
    fn a_client_written_many_times_keeps_a_bounded_history() {
        let writes = OwnWrites::default();
        let start = Instant::now();
        for version in 0..100u32 {
            writes.wrote_at(
                "u",
                Some(&version.to_string()),
                Some(&(version + 1).to_string()),
                start,
            );
        }
        let kept = writes.clients.lock().unwrap()["u"].replaced.len();
        assert_eq!(kept, KEPT);
        assert!(writes.is_stale_at("u", Some("99"), start));
    }
}
