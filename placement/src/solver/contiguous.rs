//! Megatron-style baseline: experts in id order fill the slots rank-major; spare slots repeat the
//! sequence (so expert `i mod E` sits in physical slot `i`).
use crate::placement::LayerPlacement;
use crate::{Placement, PlacementError, Topology};

pub fn solve(
    num_layers: usize,
    num_experts: usize,
    topology: &Topology,
    slots_per_rank: usize,
) -> Result<Placement, PlacementError> {
    super::check_capacity(num_experts, topology, slots_per_rank)?;
    let ranks = topology.num_ranks();
    let layer = LayerPlacement {
        ranks: (0..ranks)
            .map(|r| (0..slots_per_rank).map(|j| (r * slots_per_rank + j) % num_experts).collect())
            .collect(),
    };
    Ok(Placement::new(num_experts, topology.clone(), vec![layer; num_layers]))
}
