//! The bridges port (`--bridges-listen`): each connection sends its preamble, is
//! authorized against the bridge it names and the peer table, and is handed to the data
//! plane as a forward's connection would be; anything else closes it. Bounded: at most
//! `PENDING` connections may be sending their preamble at once, each for at most
//! `PREAMBLE_TIMEOUT`; refusals are counted by reason and logged at most
//! `REFUSALS_LOGGED_PER_SECOND` times a second.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::{Bridges, Refusal, authorize, preamble};
use crate::dataplane::{Bridged, HandInError, Handle};
use crate::metrics::Metrics;

/// Connections that may be sending their preamble at once (beyond: closed at once).
pub const PENDING: usize = 1_024;
/// How long a connection may take to send its whole preamble.
pub const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Refusals logged per second (the rest are counted only).
const REFUSALS_LOGGED_PER_SECOND: u32 = 10;

/// Serves the bridges port until the task is dropped.
pub async fn serve(listener: TcpListener, bridges: Bridges, handle: Handle, metrics: Arc<Metrics>) {
    let pending = Arc::new(Semaphore::new(PENDING));
    let log = Arc::new(LogBudget::new(REFUSALS_LOGGED_PER_SECOND));
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors, most likely: give the flows a moment to end.
                tracing::warn!(%error, "accepting on the bridges port failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            drop(stream);
            refused(&metrics, &log, Refusal::TooManyPending, None, from);
            continue;
        };
        let (bridges, handle, metrics, log) = (
            bridges.clone(),
            handle.clone(),
            metrics.clone(),
            log.clone(),
        );
        tokio::spawn(async move {
            if let Err((reason, bridge)) = take(stream, from, &bridges, &handle).await {
                refused(&metrics, &log, reason, bridge.as_deref(), from);
            }
            drop(permit);
        });
    }
}

/// One connection: its preamble, its bridge's authorization, the handoff. A refusal
/// (with the bridge's name once known) drops, and so closes, the stream.
async fn take(
    mut stream: TcpStream,
    from: SocketAddr,
    bridges: &Bridges,
    handle: &Handle,
) -> Result<(), (Refusal, Option<String>)> {
    let asked = tokio::time::timeout(PREAMBLE_TIMEOUT, preamble::read(&mut stream))
        .await
        .map_err(|_| (Refusal::PreambleTimeout, None))?
        .map_err(|reason| (reason, None))?;
    let named = |reason| (reason, Some(asked.bridge.clone()));
    let bridge = bridges.get(&asked.bridge);
    let peers = handle.peers();
    let target = authorize(bridge.as_ref(), asked.port, peers.values()).map_err(named)?;
    let client = bridge.map(|bridge| bridge.client).unwrap_or_default();
    let stream = stream
        .into_std()
        .map_err(|_| named(Refusal::DataPlaneBusy))?;
    let bridged = Bridged {
        bridge: asked.bridge.clone(),
        client,
    };
    handle
        .hand_in(stream, target, from, bridged)
        .map_err(|error| {
            named(match error {
                // The peer table changed since `peers` was read.
                HandInError::NoPeer => Refusal::ClientNotConnected,
                HandInError::QueueFull | HandInError::Stopped => Refusal::DataPlaneBusy,
            })
        })
}

fn refused(
    metrics: &Metrics,
    log: &LogBudget,
    reason: Refusal,
    bridge: Option<&str>,
    from: SocketAddr,
) {
    metrics
        .bridge_refused
        .with_label_values(&[reason.label()])
        .inc();
    if let Some(unlogged) = log.take(Instant::now()) {
        tracing::info!(
            bridge = bridge.unwrap_or("-"),
            reason = reason.label(),
            %from,
            unlogged,
            "bridge connection refused"
        );
    }
}

/// At most `per_second` log lines a second; the next logged line says how many were left
/// out.
struct LogBudget {
    per_second: u32,
    window: Mutex<Window>,
}

struct Window {
    started: Instant,
    logged: u32,
    unlogged: u64,
}

impl LogBudget {
    fn new(per_second: u32) -> Self {
        Self {
            per_second,
            window: Mutex::new(Window {
                started: Instant::now(),
                logged: 0,
                unlogged: 0,
            }),
        }
    }

    /// Whether to log a line at `now`: `Some(lines left out since the last one logged)`.
    fn take(&self, now: Instant) -> Option<u64> {
        let mut window = self
            .window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if now.saturating_duration_since(window.started) >= Duration::from_secs(1) {
            window.started = now;
            window.logged = 0;
        }
        if window.logged < self.per_second {
            window.logged += 1;
            Some(std::mem::take(&mut window.unlogged))
        } else {
            window.unlogged += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_a_few_times_a_second_and_the_rest_counted() {
        let budget = LogBudget::new(2);
        let start = Instant::now();
        assert_eq!(budget.take(start), Some(0));
        assert_eq!(budget.take(start), Some(0));
        assert_eq!(budget.take(start), None);
        assert_eq!(budget.take(start + Duration::from_millis(900)), None);
        let next = start + Duration::from_secs(1);
        assert_eq!(budget.take(next), Some(2), "says how many were left out");
        assert_eq!(budget.take(next), Some(0));
        assert_eq!(budget.take(next), None);
    }
}
