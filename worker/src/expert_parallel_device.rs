#![deny(unsafe_code)]
//! [`DeviceDispatch`] for [`EpExecutor`]: a MoE layer of a group's rank whose rows a device
//! backend keeps in device memory. One collective here (each row's expert id), then the
//! backend's two row exchanges (through the transport's device path where it has one).

use super::{ep_err, proto_err, EpExecutor};
use crate::error::{ModelError, Result};
use crate::moe::{DeviceDispatch, DispatchPlan, MoeLayer, Routing};
use crate::transport::DeviceSpan;
use std::time::Instant;

/// The device protocol of a MoE layer (see [`DeviceDispatch`]): the ids collective here, then
/// the backend's two row exchanges. Same replica choice and capacity as [`EpExecutor::run`].
impl DeviceDispatch for EpExecutor {
    fn rank(&self) -> usize {
        self.rank
    }

    fn plan(&self, layer: &MoeLayer, routing: &Routing) -> Result<DispatchPlan> {
        let li = layer.moe_index;
        let slots = self.slots();
        if li >= slots.replicas.len() {
            return Err(proto_err(format!("MoE layer {li} is not in the placement")));
        }
        let send = self.dispatch_items(&slots, li, routing, routing.n_tokens())?;
        let msgs: Vec<Vec<u8>> = send
            .iter()
            .map(|its| {
                let mut b = Vec::with_capacity(4 * its.len());
                for &(_, e, _) in its {
                    b.extend_from_slice(&e.to_le_bytes());
                }
                b
            })
            .collect();
        let recv = self.a2a(msgs)?;
        let mut recv_experts = Vec::with_capacity(self.world);
        for (src, b) in recv.iter().enumerate() {
            if b.len() % 4 != 0 {
                return Err(proto_err(format!("rank {}: expert ids from rank {src}: {} bytes", self.rank, b.len())));
            }
            let ids: Vec<u32> = b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            if let Some(&e) = ids.iter().find(|&&e| slots.experts[li].get(e as usize).is_none_or(|w| w.is_none())) {
                return Err(ModelError::ExpertNotLoaded { layer: li, expert: e as usize });
            }
            recv_experts.push(ids);
        }
        Ok(DispatchPlan { send, recv_experts, experts: slots.experts[li].clone() })
    }

    fn exchange(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        self.a2a(send)
    }

    fn moves_device_memory(&self) -> bool {
        self.transport.lock().is_ok_and(|t| t.moves_device_memory())
    }

    fn exchange_device(&self, send: &[DeviceSpan], recv: &[DeviceSpan]) -> Result<()> {
        let t0 = Instant::now();
        self.end_segment();
        {
            let mut t = self.transport.lock().map_err(|_| proto_err("transport lock poisoned".into()))?;
            t.all_to_all_device(send, recv).map_err(ep_err)?;
        }
        self.start_segment();
        let bytes: u64 = send.iter().enumerate().filter(|(r, _)| *r != self.rank).map(|(_, s)| s.bytes as u64).sum();
        self.count_alltoall(bytes, t0);
        Ok(())
    }
}
