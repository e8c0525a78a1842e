//! NCCL all-to-all-v through `cudarc` (feature `cuda`).
//!
//! NCCL has no all-to-all-v: one group of per-peer `send`/`recv` moves the sizes (u64 per peer),
//! a second group moves the payloads, with one receive buffer per peer.
//! [`NcclTransport::all_to_all_v_device`] takes device buffers (a CUDA backend's rows);
//! [`Transport::all_to_all_v`] stages host buffers (CPU workers) through it. Rank 0 makes the unique id ([`new_unique_id`]); the coordinator hands it out.
use super::{DeviceSpan, Transport, TransportError};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
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

    fn moves_device_memory(&self) -> bool {
        true
    }

    /// One group of per-peer sends and receives on the caller's device memory (no counts phase:
    /// the sizes were agreed beforehand); waits for it.
    fn all_to_all_device(&mut self, send: &[DeviceSpan], recv: &[DeviceSpan]) -> Result<(), TransportError> {
        if send.len() != self.world || recv.len() != self.world {
            return Err(TransportError::Usage { rank: self.rank, msg: format!("{} / {} spans for a world of {}", send.len(), recv.len(), self.world) });
        }
        cudarc::nccl::result::group_start().map_err(|e| self.err("group start", e))?;
        for j in (0..self.world).filter(|&j| j != self.rank) {
            if send[j].bytes > 0 {
                self.comm.send(&Span { span: send[j], stream: &self.stream }, j as i32).map_err(|e| self.err("send", e))?;
            }
            if recv[j].bytes > 0 {
                self.comm.recv(&mut Span { span: recv[j], stream: &self.stream }, j as i32).map_err(|e| self.err("recv", e))?;
            }
        }
        cudarc::nccl::result::group_end().map_err(|e| self.err("group end", e))?;
        self.stream.synchronize().map_err(|e| self.err("synchronize", e))
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
        // Host buffers (CPU workers on GPU nodes): staged through the device path.
        let s = self.stream.clone();
        let mut dev = Vec::with_capacity(self.world);
        for (j, b) in send.iter().enumerate() {
            let keep_on_host = j == self.rank || b.is_empty();
            dev.push(if keep_on_host { s.alloc_zeros::<u8>(0) } else { s.clone_htod(b.as_slice()) }.map_err(|e| self.err("htod", e))?);
        }
        let recv = self.all_to_all_v_device(dev)?;
        let mut out = Vec::with_capacity(self.world);
        for (j, d) in recv.iter().enumerate() {
            if j == self.rank {
                out.push(std::mem::take(&mut send[j]));
            } else if d.is_empty() {
                out.push(Vec::new());
            } else {
                out.push(s.clone_dtoh(d).map_err(|e| self.err("dtoh", e))?);
            }
        }
        Ok(out)
    }
}

/// Device memory another owner holds (a backend's buffers), as NCCL's API takes it.
struct Span<'a> {
    span: DeviceSpan,
    stream: &'a Arc<CudaStream>,
}

impl DeviceSlice<u8> for Span<'_> {
    fn len(&self) -> usize {
        self.span.bytes
    }
    fn stream(&self) -> &Arc<CudaStream> {
        self.stream
    }
}

impl DevicePtr<u8> for Span<'_> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (cudarc::driver::sys::CUdeviceptr, SyncOnDrop<'a>) {
        // The owner finished writing before the exchange (it synchronized its stream).
        (self.span.addr, SyncOnDrop::Sync(None))
    }
}

impl DevicePtrMut<u8> for Span<'_> {
    fn device_ptr_mut<'a>(&'a mut self, _stream: &'a CudaStream) -> (cudarc::driver::sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.span.addr, SyncOnDrop::Sync(None))
    }
}

impl NcclTransport {
    /// All-to-all-v of device buffers (device-resident activations): `send[r]` goes to rank `r`;
    /// returns what each rank sent here, in fresh device buffers (the own slot is moved through).
    /// The counts travel on the device too (one u64 per peer); only they are read back, to size
    /// the receive buffers.
    pub fn all_to_all_v_device(&mut self, mut send: Vec<CudaSlice<u8>>) -> Result<Vec<CudaSlice<u8>>, TransportError> {
        if send.len() != self.world {
            return Err(TransportError::Usage { rank: self.rank, msg: format!("{} buffers for a world of {}", send.len(), self.world) });
        }
        let s = self.stream.clone();
        let counts: Vec<u64> = send.iter().map(|b| b.len() as u64).collect();
        let count_send: Vec<CudaSlice<u64>> = counts.iter().map(|c| s.clone_htod(&[*c])).collect::<Result<_, _>>().map_err(|e| self.err("htod", e))?;
        let mut count_recv: Vec<CudaSlice<u64>> = (0..self.world).map(|_| s.alloc_zeros::<u64>(1)).collect::<Result<_, _>>().map_err(|e| self.err("alloc", e))?;
        self.exchange(&count_send, &mut count_recv)?;
        let mut sizes = vec![0usize; self.world];
        for (j, d) in count_recv.iter().enumerate() {
            sizes[j] = if j == self.rank { 0 } else { s.clone_dtoh(d).map_err(|e| self.err("dtoh", e))?[0] as usize };
        }
        let mut recv: Vec<CudaSlice<u8>> = sizes.iter().map(|&n| s.alloc_zeros::<u8>(n)).collect::<Result<_, _>>().map_err(|e| self.err("alloc", e))?;
        // The own slot is not sent: an empty stand-in goes through the exchange.
        let own = std::mem::replace(&mut send[self.rank], s.alloc_zeros::<u8>(0).map_err(|e| self.err("alloc", e))?);
        self.exchange(&send, &mut recv)?;
        recv[self.rank] = own;
        Ok(recv)
    }
}
