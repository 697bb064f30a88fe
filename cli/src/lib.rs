//! kubectl-gefyra: the companion CLI for GefyraClient resources.
