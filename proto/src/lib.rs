//! Generated gRPC code for `switchyard.v1`: the client API ([`v1::inference_server`],
//! [`v1::inference_client`]) and the coordinator↔worker control plane ([`v1::control_server`],
//! [`v1::worker_server`]).
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("switchyard.v1");
}

/// Encoded `FileDescriptorSet` of every switchyard proto (for gRPC reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("switchyard_descriptor");
