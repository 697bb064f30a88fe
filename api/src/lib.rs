//! gefyra-api: the GefyraClient resource, its states, the client-file format and the
//! IP-range math shared by the operator, Stowaway and the CLI.
//!
//! Pure data and pure functions only (plus key generation): no I/O, no async runtime.

pub mod admission;
pub mod bridge;
pub mod bridge_rules;
pub mod bridge_wire;
pub mod client;
pub mod client_file;
pub mod connection;
pub mod crd;
pub mod ipam;
pub mod rbac;
pub mod route_shards;
pub mod wireguard;

pub use client::{ClientState, ClientStatus, GefyraClient, Provider, ServiceAccountData};
