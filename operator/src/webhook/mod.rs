//! The subnet webhook, for Gefyra's own CLI (gefyra-compat mode). Gefyra's CLI picks a
//! subnet (its local Docker network), patches `providerParameter`, and — when the subnet is
//! taken — expects the API server to refuse the patch with HTTP 500, so that it picks
//! another one by itself. A ValidatingWebhookConfiguration sends updates that change a
//! client's `providerParameter` here; a subnet that overlaps another client's route, a
//! tunnel pool or a reserved range is refused with code 500 (another client is never named
//! in the answer, only in the operator's log). Its `failurePolicy` is `Ignore`: while the
//! webhook is down or busy the operator's own check still refuses the subnet (ERROR
//! `SubnetConflict`), and nothing else depends on it.
//!
//! - [`review`]: the decision, pure, over the routes table's shards as watched here;
//! - [`server`]: the TLS listener, bounded so that no sender costs more than its share;
//! - [`certificate`]: the webhook's CA and serving certificate, renewed, and the CA
//!   published as the configuration's `caBundle`;
//! - [`configuration`]: the ValidatingWebhookConfiguration and what the chart installs
//!   with it;
//! - [`ca_policy`]: what the operator's identity may change in that configuration (its
//!   `caBundle`, nothing else), enforced by the API server.

pub mod ca_policy;
pub mod certificate;
pub mod configuration;
pub mod review;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;

use futures::StreamExt;
use gefyra_api::ipam::Pool;
use gefyra_api::route_shards::SHARD_SELECTOR;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use tracing::{info, warn};

pub use certificate::{TLS_SECRET, default_names};
pub use configuration::{Install, configuration_name, install_yaml, url_configuration};
pub use review::review_body;

/// Where the API server sends admission reviews.
pub const PATH: &str = "/validate-subnet";
/// The webhook's name inside its configuration.
pub const WEBHOOK_NAME: &str = "subnets.gefyra.dev";
/// The Service in front of the operator's webhook port (chart).
pub const SERVICE: &str = "gefyra-operator-webhook";

/// Serves the webhook over TLS on `address` until the process ends, renewing the
/// certificate and republishing the CA every hour (and at start). Every replica serves it,
/// leader or not, so it watches the routes table's shards itself: a review reads them from
/// memory, never from the API server.
pub async fn run(
    client: Client,
    namespace: String,
    pool: Pool,
    address: SocketAddr,
    configuration: String,
    names: Vec<String>,
) -> anyhow::Result<()> {
    let tls = certificate::ensure_tls(&client, &namespace, &names).await?;
    let resolver = Arc::new(certificate::CertificateResolver::new(&tls)?);
    let (shards, writer) = reflector::store();
    let watching = watcher(
        Api::<ConfigMap>::namespaced(client.clone(), &namespace),
        watcher::Config::default().labels(SHARD_SELECTOR),
    )
    .default_backoff()
    .reflect(writer)
    .for_each(|event| async move {
        if let Err(error) = event {
            warn!(%error, "watching the routes table's shards for the subnet webhook failed; retrying");
        }
    });
    let renewals = certificate::renew_forever(
        client.clone(),
        namespace.clone(),
        names,
        configuration,
        resolver.clone(),
    );
    let listener = tokio::net::TcpListener::bind(address).await?;
    let serving = async move {
        // A review from a cache that has not seen every shard could allow a taken subnet.
        shards
            .wait_until_ready()
            .await
            .map_err(|_| anyhow::anyhow!("the routes table's shards were never listed"))?;
        info!(%address, path = PATH, limits = ?server::Limits::DEFAULT, "serving the subnet webhook");
        let answer = move |body: &[u8]| {
            review::answer(body, &pool, |shard| {
                shards.get(&reflector::ObjectRef::new(shard).within(&namespace))
            })
        };
        server::serve(
            listener,
            server::tls_acceptor(resolver)?,
            server::Limits::DEFAULT,
            Arc::new(answer),
        )
        .await;
        anyhow::Ok(())
    };
    tokio::select! {
        () = watching => Ok(()),
        () = renewals => Ok(()),
        served = serving => served,
    }
}
