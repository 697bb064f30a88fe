//! `connect --userspace`: the pieces of a tunnel the CLI process speaks itself.
pub mod proxy;
pub mod spec;
