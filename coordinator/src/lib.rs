//! Switchyard control-plane library: the state store (etcd or embedded).
pub mod store;
pub mod control;
