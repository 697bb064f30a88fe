//! gefyra-operator: reconciles GefyraClient resources into credentials, RBAC and
//! exclusive WireGuard IP ranges.

pub mod allocator;
pub mod bridging;
pub mod connection;
pub mod context;
pub mod controller;
pub mod credentials;
pub mod error;
pub mod http;
pub mod index;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod own_writes;
pub mod owned;
pub mod rbac;
pub mod ready;
pub mod reconcile;
pub mod route_budget;
pub mod routes;
pub mod run;
pub mod sweep;
pub mod webhook;
