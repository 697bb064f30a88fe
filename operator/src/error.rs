//! One error type; each variant names the step that failed and the object it failed on.

use gefyra_api::ClientState;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "client {client}: sunset {sunset:?} is not an RFC 3339 time; fix the client's sunset field"
    )]
    InvalidSunset { client: String, sunset: String },
    #[error("applying {kind} {name} failed: {source}; check the operator's RBAC")]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "minting a token for ServiceAccount {account} failed: {source}; check that the operator may create serviceaccounts/token"
    )]
    MintToken {
        account: String,
        #[source]
        source: kube::Error,
    },
    #[error("the API server returned no token for ServiceAccount {account}")]
    EmptyToken { account: String },
    #[error("reading the cluster CA (ConfigMap kube-root-ca.crt) in namespace {namespace} failed{}; is kube-controller-manager running?", source.as_ref().map(|s| format!(": {s}")).unwrap_or_default())]
    ClusterCa {
        namespace: String,
        #[source]
        source: Option<kube::Error>,
    },
    #[error("client {client}: recording state {state} failed: {source}")]
    RecordState {
        client: String,
        state: ClientState,
        #[source]
        source: kube::Error,
    },
    #[error("client {client}: recording credentials failed: {source}")]
    RecordCredentials {
        client: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting client {client} at its sunset failed: {source}")]
    Delete {
        client: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "cleanup: deleting {kind} {name} failed: {source}; the client stays until this succeeds"
    )]
    Cleanup {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("client {client}: {message}")]
    InvalidParameter { client: String, message: String },
    #[error(
        "client {client}: {source}; it connects as soon as an address is free (disconnect idle clients or enlarge --tunnel-pool)"
    )]
    PoolExhausted {
        client: String,
        #[source]
        source: gefyra_api::ipam::IpamError,
    },
    #[error("client {client}: {source}; choose another providerParameter.subnet")]
    SubnetConflict {
        client: String,
        #[source]
        source: gefyra_api::ipam::IpamError,
    },
    #[error("client {client}: {message}")]
    RouteChangesTooOften {
        client: String,
        message: String,
        retry_in: std::time::Duration,
    },
    #[error("recording a routed range failed: {0}")]
    AllocationTable(#[from] crate::routes::TableError),
    #[error("client {client}: claiming or releasing a tunnel address failed: {source}")]
    TunnelClaim {
        client: String,
        #[source]
        source: crate::allocator::ClaimError,
    },
    #[error(
        "reading or creating the Stowaway key Secret {}: {source}",
        crate::allocator::SERVER_KEY_SECRET
    )]
    ServerKey {
        #[source]
        source: kube::Error,
    },
    #[error("client {client}: recording the connection failed: {source}")]
    RecordConnection {
        client: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "client {client}: its public key is already the key of another client, which connected first; generate a new key pair (kubectl gefyra connect does) and connect again"
    )]
    DuplicatePublicKey { client: String },
    #[error("client {client}: {message}; an admin must correct maxConnectionAge")]
    InvalidConnectionAge { client: String, message: String },
    #[error(
        "the Stowaway key Secret {} is unusable: {problem}; delete it and restart the operator to create a new one",
        crate::allocator::SERVER_KEY_SECRET
    )]
    InvalidServerKey { problem: String },
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A bounded label for metrics and the reason of Events and conditions.
    pub fn category(&self) -> &'static str {
        match self {
            Self::InvalidSunset { .. } => "InvalidSunset",
            Self::Apply { .. } => "ApplyFailed",
            Self::MintToken { .. } | Self::EmptyToken { .. } => "TokenRequestFailed",
            Self::ClusterCa { .. } => "ClusterCaMissing",
            Self::RecordState { .. } | Self::RecordCredentials { .. } => "StatusWriteFailed",
            Self::Delete { .. } => "SunsetDeleteFailed",
            Self::Cleanup { .. } => "CleanupFailed",
            Self::InvalidParameter { .. } => "InvalidParameter",
            Self::PoolExhausted { .. } => "PoolExhausted",
            Self::SubnetConflict { .. } => "SubnetConflict",
            Self::RouteChangesTooOften { .. } => "RouteChangesTooOften",
            Self::AllocationTable(_) => "AllocationTableFailed",
            Self::TunnelClaim { .. } => "TunnelClaimFailed",
            Self::ServerKey { .. } => "ServerKeyFailed",
            Self::RecordConnection { .. } => "StatusWriteFailed",
            Self::DuplicatePublicKey { .. } => "DuplicatePublicKey",
            Self::InvalidConnectionAge { .. } => "InvalidConnectionAge",
            Self::InvalidServerKey { .. } => "ServerKeyFailed",
            Self::Finalizer(_) => "FinalizerFailed",
        }
    }
}
