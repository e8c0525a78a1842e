//! Switchyard control-plane library: the state store (etcd or embedded), the control plane's
//! logic (`control`), the coordinator's gRPC server over it (`server`) and TLS.
pub mod store;
pub mod control;
pub mod registration;
pub mod server;
pub mod tls;
