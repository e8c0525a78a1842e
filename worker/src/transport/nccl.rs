//! NCCL all-to-all-v through `cudarc` (feature `cuda`).
//!
//! NCCL has no all-to-all-v: one group of per-peer `send`/`recv` moves the sizes (u64 per peer),
//! a second group moves the payloads, with one receive buffer per peer. Buffers are staged through
//! device memory because the model runs on the host today; device-resident activations would skip
//! the copies. Rank 0 makes the unique id ([`new_unique_id`]); the coordinator hands it out.
use super::{Transport, TransportError};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm, Id};
use std::sync::Arc;

/// Whether the CUDA driver and NCCL libraries can be loaded (cudarc panics otherwise).
#[allow(unsafe_code)]
pub fn nccl_available() -> bool {
    // SAFETY: only tries to dlopen the libraries.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
}

fn setup(e: impl std::fmt::Display) -> TransportError {
    TransportError::Setup(format!("nccl: {e}"))
}

/// A fresh NCCL unique id (128 bytes) to hand to every rank.
pub fn new_unique_id() -> Result<Vec<u8>, TransportError> {
    if !nccl_available() {
        return Err(setup("libcuda / libnccl not found"));
    }
    let id = Id::new().map_err(|e| setup(format!("{e:?}")))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// All-to-all-v over an NCCL communicator on GPU `device`.
pub struct NcclTransport {
    comm: Comm,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
}

// SAFETY: the communicator is owned by this value and only used through `&mut self`, i.e. from one
// thread at a time; NCCL allows a communicator to move between threads.
#[allow(unsafe_code)]
unsafe impl Send for NcclTransport {}

impl std::fmt::Debug for NcclTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclTransport").field("rank", &self.rank).field("world", &self.world).finish()
    }
}

impl NcclTransport {
    /// Join the communicator `unique_id` (from [`new_unique_id`]) as `rank` of `world` on GPU `device`.
    pub fn new(device: usize, rank: usize, world: usize, unique_id: &[u8]) -> Result<Self, TransportError> {
        if !nccl_available() {
            return Err(setup("libcuda / libnccl not found"));
        }
        if unique_id.len() != 128 {
            return Err(setup(format!("unique id has {} bytes, expected 128", unique_id.len())));
        }
        let mut raw = [0 as std::ffi::c_char; 128];
        for (d, s) in raw.iter_mut().zip(unique_id) {
            *d = *s as std::ffi::c_char;
        }
        let ctx = CudaContext::new(device).map_err(|e| setup(format!("device {device}: {e:?}")))?;
        let stream = ctx.default_stream();
        let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(raw)).map_err(|e| setup(format!("{e:?}")))?;
        Ok(NcclTransport { comm, stream, rank, world })
    }

    fn err(&self, what: &str, e: impl std::fmt::Debug) -> TransportError {
        TransportError::Protocol { rank: self.rank, peer: usize::MAX, msg: format!("nccl {what}: {e:?}") }
    }

    fn exchange<T>(&self, send: &[CudaSlice<T>], recv: &mut [CudaSlice<T>]) -> Result<(), TransportError>
    where
        T: cudarc::nccl::safe::NcclType + cudarc::driver::DeviceRepr,
    {
        let mut g = self.comm.group();
        for (j, (s, r)) in send.iter().zip(recv.iter_mut()).enumerate() {
            if j == self.rank {
                continue;
            }
            if !s.is_empty() {
                g.send(s.as_view(), j as i32).map_err(|e| self.err("send", e))?;
            }
            if !r.is_empty() {
                g.recv(r.as_view_mut(), j as i32).map_err(|e| self.err("recv", e))?;
            }
        }
        drop(g);
        self.stream.synchronize().map_err(|e| self.err("synchronize", e))
    }
}

impl Transport for NcclTransport {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn kind(&self) -> &'static str {
        "nccl"
    }

    fn all_to_all_v(&mut self, mut send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, TransportError> {
        if send.len() != self.world {
            return Err(TransportError::Usage {
                rank: self.rank,
                msg: format!("{} buffers for a world of {}", send.len(), self.world),
            });
        }
        let s = &self.stream;
        // Phase 1: sizes.
        let mut size_send = Vec::with_capacity(self.world);
        let mut size_recv = Vec::with_capacity(self.world);
        for b in &send {
            size_send.push(s.clone_htod(&[b.len() as u64]).map_err(|e| self.err("htod", e))?);
            size_recv.push(s.alloc_zeros::<u64>(1).map_err(|e| self.err("alloc", e))?);
        }
        self.exchange(&size_send, &mut size_recv)?;
        let mut sizes = vec![0usize; self.world];
        for (j, d) in size_recv.iter().enumerate() {
            sizes[j] = if j == self.rank { send[j].len() } else { s.clone_dtoh(d).map_err(|e| self.err("dtoh", e))?[0] as usize };
        }
        // Phase 2: payloads, one receive buffer per peer.
        let mut pay_send = Vec::with_capacity(self.world);
        let mut pay_recv = Vec::with_capacity(self.world);
        for (j, b) in send.iter().enumerate() {
            let n = if j == self.rank { 0 } else { b.len() };
            pay_send.push(if n == 0 { s.alloc_zeros::<u8>(0) } else { s.clone_htod(b.as_slice()) }.map_err(|e| self.err("htod", e))?);
            let m = if j == self.rank { 0 } else { sizes[j] };
            pay_recv.push(s.alloc_zeros::<u8>(m).map_err(|e| self.err("alloc", e))?);
        }
        self.exchange(&pay_send, &mut pay_recv)?;
        let mut out = Vec::with_capacity(self.world);
        for (j, d) in pay_recv.iter().enumerate() {
            if j == self.rank {
                out.push(std::mem::take(&mut send[j]));
            } else if sizes[j] == 0 {
                out.push(Vec::new());
            } else {
                out.push(s.clone_dtoh(d).map_err(|e| self.err("dtoh", e))?);
            }
        }
        Ok(out)
    }
}
