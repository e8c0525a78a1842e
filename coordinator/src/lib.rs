//! Switchyard control-plane library: the state store (etcd or embedded), the control plane's
//! logic (`control`), the coordinator's gRPC server over it (`server`), its OpenAI-compatible
//! HTTP API (`http`) and TLS.
pub mod store;
pub mod control;
pub mod registration;
pub mod server;
pub mod tls;
pub mod http;
