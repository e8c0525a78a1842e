use serde::{Deserialize, Serialize};

use crate::PlacementError;

/// Ranks grouped into nodes. Rank ids are `0..num_ranks`; every rank belongs to exactly one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    pub nodes: Vec<Vec<usize>>,
}

impl Topology {
    /// `ranks` ranks split into `nodes` nodes of equal size, consecutive ranks on one node.
    pub fn uniform(ranks: usize, nodes: usize) -> Result<Self, PlacementError> {
        if ranks == 0 || nodes == 0 {
            return Err(PlacementError::Topology("ranks and nodes must be positive".into()));
        }
        if !ranks.is_multiple_of(nodes) {
            return Err(PlacementError::Topology(format!(
                "{ranks} ranks do not divide into {nodes} nodes of equal size"
            )));
        }
        let per = ranks / nodes;
        Ok(Self { nodes: (0..nodes).map(|n| (n * per..(n + 1) * per).collect()).collect() })
    }

    pub fn num_ranks(&self) -> usize {
        self.nodes.iter().map(Vec::len).sum()
    }

    pub fn num_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Node of every rank, indexed by rank.
    pub fn node_of_rank(&self) -> Vec<usize> {
        let mut out = vec![usize::MAX; self.num_ranks()];
        for (n, ranks) in self.nodes.iter().enumerate() {
            for &r in ranks {
                if r < out.len() {
                    out[r] = n;
                }
            }
        }
        out
    }

    /// Every rank `0..num_ranks` appears exactly once and no node is empty.
    pub fn validate(&self) -> Result<(), PlacementError> {
        let n = self.num_ranks();
        if n == 0 {
            return Err(PlacementError::Topology("no ranks".into()));
        }
        let mut seen = vec![false; n];
        for (i, node) in self.nodes.iter().enumerate() {
            if node.is_empty() {
                return Err(PlacementError::Topology(format!("node {i} has no ranks")));
            }
            for &r in node {
                if r >= n {
                    return Err(PlacementError::Topology(format!(
                        "rank {r} on node {i} is out of range (ranks are 0..{n})"
                    )));
                }
                if std::mem::replace(&mut seen[r], true) {
                    return Err(PlacementError::Topology(format!("rank {r} appears twice")));
                }
            }
        }
        Ok(())
    }
}
