#![deny(unsafe_code)]
//! All-to-all-v between the ranks of an expert-parallel group.
//!
//! Every rank calls [`Transport::all_to_all_v`] with one buffer per destination rank (empty buffers
//! are fine and must still be sent: every rank joins every collective). Sizes travel before payloads
//! so receivers allocate exactly once. [`tcp::TcpTransport`] is a full mesh of TCP connections
//! (CPU clusters); `nccl::NcclTransport` (feature `cuda`) uses grouped NCCL send/recv per peer.

pub mod tcp;
#[cfg(feature = "cuda")]
pub mod nccl;

use std::time::Duration;

/// Why a collective failed. After an error the transport is unusable (a peer is gone or the
/// streams are out of step): the caller must rebuild its group.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("rank {rank}: peer rank {peer} closed the connection (worker died?)")]
    PeerClosed { rank: usize, peer: usize },
    #[error("rank {rank}: no data from peer rank {peer} within {timeout:?}")]
    Timeout { rank: usize, peer: usize, timeout: Duration },
    #[error("rank {rank}: I/O error with peer rank {peer}: {source}")]
    Io {
        rank: usize,
        peer: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("rank {rank}: protocol error with peer rank {peer}: {msg}")]
    Protocol { rank: usize, peer: usize, msg: String },
    #[error("transport setup: {0}")]
    Setup(String),
    #[error("rank {rank}: bad call: {msg}")]
    Usage { rank: usize, msg: String },
    #[error("transport already failed: {0}")]
    Failed(String),
    #[error("building the mesh of generation {generation} was cancelled (a newer generation started)")]
    Cancelled { generation: u64 },
}

/// Shuts a transport's connections down from another thread (see
/// [`Transport::interrupt_handle`]).
#[derive(Clone)]
pub struct InterruptHandle(std::sync::Arc<dyn Fn() + Send + Sync>);

impl InterruptHandle {
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Self {
        InterruptHandle(std::sync::Arc::new(f))
    }

    /// Make every collective in progress (and every later one) fail at once.
    pub fn interrupt(&self) {
        (self.0)()
    }
}

impl std::fmt::Debug for InterruptHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InterruptHandle")
    }
}

/// A span of device memory (a GPU address and a byte count) for
/// [`Transport::all_to_all_device`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSpan {
    pub addr: u64,
    pub bytes: usize,
}

/// An all-to-all-v communicator over `world()` ranks.
pub trait Transport: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// `send[r]` goes to rank `r` (`send.len() == world()`); returns `recv[r]`, what rank `r` sent to
    /// this rank. The own slot is moved through without a copy.
    fn all_to_all_v(&mut self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, TransportError>;
    /// Short name for logs and benchmarks ("tcp", "nccl", "local").
    fn kind(&self) -> &'static str;
    /// Whether [`Transport::all_to_all_device`] moves device memory (NCCL); the others move
    /// host memory only.
    fn moves_device_memory(&self) -> bool {
        false
    }
    /// All-to-all-v of device memory: `send[r]` goes to rank `r`, `recv[r]` receives what rank
    /// `r` sends (sizes agreed beforehand; the own slots are skipped).
    fn all_to_all_device(&mut self, _send: &[DeviceSpan], _recv: &[DeviceSpan]) -> Result<(), TransportError> {
        Err(TransportError::Usage { rank: self.rank(), msg: format!("the {} transport moves host memory only", self.kind()) })
    }
    /// A handle to interrupt collectives from another thread, where the transport can (a group
    /// that regroups without a dead peer's help needs it); `None`: it cannot.
    fn interrupt_handle(&self) -> Option<InterruptHandle> {
        None
    }
}

/// The one-rank group: all-to-all is the identity.
#[derive(Debug, Default)]
pub struct LocalTransport;

impl Transport for LocalTransport {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_to_all_v(&mut self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, TransportError> {
        if send.len() != 1 {
            return Err(TransportError::Usage { rank: 0, msg: format!("{} buffers for a world of 1", send.len()) });
        }
        Ok(send)
    }
    fn kind(&self) -> &'static str {
        "local"
    }
}
