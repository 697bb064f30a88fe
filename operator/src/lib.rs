//! gefyra-operator: reconciles GefyraClient resources into credentials, RBAC and
//! exclusive WireGuard IP ranges.
