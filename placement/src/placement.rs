//! The placement file (`switchyard.placement.v1`): for every MoE layer, the logical expert ids that
//! every rank hosts. An expert may sit on several ranks (replicas); every rank has the same number of
//! slots.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{PlacementError, Topology};

pub const FORMAT: &str = "switchyard.placement.v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerPlacement {
    /// `ranks[r]` = the logical experts in rank r's slots.
    pub ranks: Vec<Vec<usize>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub format: String,
    pub num_layers: usize,
    pub num_experts: usize,
    pub topology: Topology,
    pub layers: Vec<LayerPlacement>,
}

impl Placement {
    pub fn new(num_experts: usize, topology: Topology, layers: Vec<LayerPlacement>) -> Self {
        Self { format: FORMAT.into(), num_layers: layers.len(), num_experts, topology, layers }
    }

    pub fn num_ranks(&self) -> usize {
        self.topology.num_ranks()
    }

    pub fn slots_per_rank(&self) -> usize {
        self.layers.first().and_then(|l| l.ranks.first()).map_or(0, Vec::len)
    }

    /// Ranks hosting each expert of layer `layer`, indexed by expert.
    pub fn replicas(&self, layer: usize) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.num_experts];
        for (r, slots) in self.layers[layer].ranks.iter().enumerate() {
            for &e in slots {
                out[e].push(r);
            }
        }
        out
    }

    /// Checks the invariants every consumer relies on; the error names the first violation.
    pub fn validate(&self) -> Result<(), PlacementError> {
        let bad = |m: String| Err(PlacementError::Invalid(m));
        if self.format != FORMAT {
            return bad(format!("format is {:?}, expected {FORMAT:?}", self.format));
        }
        self.topology.validate()?;
        if self.num_experts == 0 {
            return bad("num_experts is 0".into());
        }
        if self.num_layers != self.layers.len() {
            return bad(format!(
                "num_layers is {} but {} layers are listed",
                self.num_layers,
                self.layers.len()
            ));
        }
        if self.num_layers == 0 {
            return bad("no layers".into());
        }
        let ranks = self.num_ranks();
        let slots = self.slots_per_rank();
        if slots == 0 {
            return bad("ranks have no slots".into());
        }
        if ranks * slots < self.num_experts {
            return bad(format!(
                "{ranks} ranks x {slots} slots cannot hold {} experts",
                self.num_experts
            ));
        }
        for (l, layer) in self.layers.iter().enumerate() {
            if layer.ranks.len() != ranks {
                return bad(format!(
                    "layer {l} lists {} ranks, topology has {ranks}",
                    layer.ranks.len()
                ));
            }
            let mut present = vec![false; self.num_experts];
            for (r, s) in layer.ranks.iter().enumerate() {
                if s.len() != slots {
                    return bad(format!(
                        "layer {l} rank {r} has {} slots, rank 0 of layer 0 has {slots}",
                        s.len()
                    ));
                }
                for (i, &e) in s.iter().enumerate() {
                    if e >= self.num_experts {
                        return bad(format!(
                            "layer {l} rank {r}: expert {e} out of range (num_experts {})",
                            self.num_experts
                        ));
                    }
                    if s[..i].contains(&e) {
                        return bad(format!("layer {l} rank {r}: expert {e} twice on one rank"));
                    }
                    present[e] = true;
                }
            }
            if let Some(e) = present.iter().position(|p| !p) {
                return bad(format!("layer {l}: expert {e} has no slot"));
            }
        }
        Ok(())
    }

    /// Parses and validates placement JSON received from elsewhere than a file (e.g. over gRPC).
    pub fn from_json(text: &str) -> Result<Self, PlacementError> {
        Self::parse(text, Path::new("<placement json>"))
    }

    /// Reads and validates a placement file.
    pub fn read(path: &Path) -> Result<Self, PlacementError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| PlacementError::Io { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    fn parse(text: &str, origin: &Path) -> Result<Self, PlacementError> {
        let p: Placement = serde_json::from_str(text)
            .map_err(|e| PlacementError::Parse { path: origin.into(), reason: e.to_string() })?;
        p.validate()?;
        Ok(p)
    }

    pub fn write(&self, path: &Path) -> Result<(), PlacementError> {
        let text = serde_json::to_string_pretty(self).expect("placement serialises");
        std::fs::write(path, text).map_err(|source| PlacementError::Io { path: path.into(), source })
    }

    /// SGLang's `--init-expert-location` form: `physical_to_logical_map[layer][physical slot]`,
    /// physical slots numbered rank-major.
    pub fn to_sglang(&self) -> serde_json::Value {
        let map: Vec<Vec<usize>> =
            self.layers.iter().map(|l| l.ranks.iter().flatten().copied().collect()).collect();
        serde_json::json!({ "physical_to_logical_map": map })
    }

    /// Checks this placement fits a model/trace with `num_layers` MoE layers of `num_experts`.
    pub fn check_shape(&self, num_layers: usize, num_experts: usize) -> Result<(), PlacementError> {
        if self.num_layers != num_layers || self.num_experts != num_experts {
            return Err(PlacementError::Mismatch(format!(
                "placement has {} layers x {} experts, statistics have {num_layers} x {num_experts}",
                self.num_layers, self.num_experts
            )));
        }
        Ok(())
    }
}
