//! Forwards: a TCP port on the cluster side whose connections go through the tunnel to an
//! address a connected peer holds; and the bridges' connections (`crate::bridges`), handed
//! in from outside the data plane, which may reach their own client's peer only.

use std::io;
use std::net::{Shutdown, SocketAddr};

use gefyra_api::ipam::SERVER_ADDRESS;

use super::DataPlane;
use crate::bridges::Refusal;

/// A TCP port on the cluster side whose connections go through the tunnel to `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub listen: SocketAddr,
    pub target: SocketAddr,
}

impl std::str::FromStr for Forward {
    type Err = String;

    /// `PORT=ADDR:PORT` (listens on every address) or `LISTEN_ADDR:PORT=ADDR:PORT`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (listen, target) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?} is not PORT=ADDRESS:PORT"))?;
        let listen = match listen.parse::<u16>() {
            Ok(port) => SocketAddr::from(([0, 0, 0, 0], port)),
            Err(_) => listen
                .parse()
                .map_err(|_| format!("{listen:?} is neither a port nor ADDRESS:PORT"))?,
        };
        let target: SocketAddr = target
            .parse()
            .map_err(|_| format!("{target:?} is not ADDRESS:PORT"))?;
        if target.is_ipv6() {
            return Err(format!(
                "{target}: forwards to IPv6 addresses are not supported yet"
            ));
        }
        Ok(Self { listen, target })
    }
}

/// Whose a connection from the bridges port is: it may reach only the peer of `client`,
/// whoever holds its target by the time it arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridged {
    /// The GefyraBridge's name (for the log).
    pub bridge: String,
    /// The GefyraClient whose peer must hold the target.
    pub client: String,
}

impl DataPlane {
    /// Connections on a forward listener: through the tunnel to the forward's target, if a
    /// connected peer holds it and its limits allow one more flow.
    pub(super) fn accept(&mut self, listener: usize) {
        loop {
            let Some((listener, forward)) = self.listeners.get(listener) else {
                return;
            };
            let target = forward.target;
            let (stream, from) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) => {
                    tracing::warn!(%error, "accepting on a forward listener failed");
                    return;
                }
            };
            // The worker whose peer holds the target takes the connection.
            let owner = crate::peers::route(self.all_peers.values(), target.ip())
                .map(|spec| crate::shard::worker_of_key(&spec.public_key, self.shard.count()));
            match owner {
                Some(worker) if worker != self.shard.id() => {
                    self.hand_over(
                        worker,
                        super::Handoff::Forward {
                            stream,
                            target,
                            from,
                            bridged: None,
                        },
                    );
                }
                _ => self.forward_here(stream, target, from, None),
            }
        }
    }

    /// A forward's connection through this worker's tunnel to `target`, if one of its peers
    /// holds it (a bridge's: the peer of its own client) and its limits allow one more flow.
    pub(super) fn forward_here(
        &mut self,
        stream: mio::net::TcpStream,
        target: SocketAddr,
        from: SocketAddr,
        bridged: Option<Bridged>,
    ) {
        let local = SocketAddr::new(SERVER_ADDRESS, self.ephemeral_port());
        // A refused connection is closed only once counted.
        let refused = match (self.endpoint.owner(target.ip()), &bridged) {
            // The peer table changed since the bridge was authorized: the target is no
            // longer its client's.
            (Some(holder), Some(bridged)) if holder != bridged.client => {
                Some((Refusal::ForeignDestination, stream))
            }
            (Some(peer), _) => self
                .open_forwarded(peer, stream, target, local)
                .err()
                .map(|stream| (Refusal::FlowRefused, stream)),
            (None, _) => {
                if bridged.is_none() {
                    tracing::info!(%from, %target, "forward refused: no connected client holds the target");
                }
                Some((Refusal::ClientNotConnected, stream))
            }
        };
        if refused.is_some() {
            self.metrics
                .flows_total
                .with_label_values(&["tcp", "refused"])
                .inc();
        }
        if let Some(bridged) = bridged {
            match &refused {
                None => self.metrics.bridge_connections.inc(),
                Some((reason, _)) => {
                    // Over a limit is the likely reason, and a flood's: not logged each
                    // time (the flow limits log theirs at debug).
                    tracing::debug!(bridge = %bridged.bridge, client = %bridged.client, %from, %target, reason = reason.label(), "bridge connection refused");
                    self.metrics
                        .bridge_refused
                        .with_label_values(&[reason.label()])
                        .inc();
                }
            }
        }
        if let Some((_, stream)) = refused {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn ephemeral_port(&mut self) -> u16 {
        let port = self.next_port;
        self.next_port = if port == u16::MAX { 49_152 } else { port + 1 };
        port
    }
}
