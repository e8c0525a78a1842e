//! What a placement costs on the runtime's two data paths, by the rules the workers use
//! (`worker::expert_parallel::DataPath`): the bytes every rank sends per token and MoE layer
//! (dispatch, combine and, on the affinity path, the KV exchange and the final hidden states sent
//! home), the share of (token, expert) rows whose dispatch and combine stay on their rank, and
//! the tokens that move.
//!
//! - **home**: a token's rows go from its home rank to its experts' ranks and back.
//! - **affinity**: a token's combine lands on the rank of its primary expert ([`destination`]),
//!   which runs its next attention; a token away from home after the last layer sends its final
//!   hidden state home; every rank sends the KV entries of the tokens it ran attention for to the
//!   other ranks of its coherence group. Prompt tokens stay home (their KV goes out as a block).
//!
//! The workers call [`destination`] and [`rows_sent`] themselves, and the byte counts below are
//! their wire format's, so a score is a prediction of what the workers' counters will read on
//! the same routing.

use crate::{Placement, PlacementError, RoutingTrace};
use serde::Serialize;

/// Which data path to score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    Home,
    /// Coherence groups of `group` consecutive ranks (0: all ranks).
    Affinity { group: usize },
}

/// The model and workload facts the byte counts need.
#[derive(Debug, Clone, Copy)]
pub struct PathShape {
    /// Hidden size (f32 rows on the wire).
    pub hidden: usize,
    /// Floats of one token's keys and values in one layer.
    pub kv_floats: usize,
    /// Model layers whose KV the affinity path exchanges (those after the first MoE layer).
    pub kv_layers: usize,
    /// Every trace sequence is served as requests of `prompt_tokens` prompt tokens (prefilled at
    /// home) followed by `new_tokens` decoded ones, each request on rank `index mod ranks`.
    pub prompt_tokens: usize,
    pub new_tokens: usize,
}

/// Bytes of the wire format (little-endian u32/u64 fields, f32 rows).
pub mod wire {
    /// Home dispatch: the expert id and the row.
    pub fn home_dispatch(hidden: usize) -> usize {
        4 + 4 * hidden
    }
    /// Home combine: the row.
    pub fn home_combine(hidden: usize) -> usize {
        4 * hidden
    }
    /// Affinity dispatch row: expert, destination, token key, k index; the row.
    pub fn dispatch(hidden: usize) -> usize {
        16 + 4 * hidden
    }
    /// Affinity combine row: source, token key, k index; the row.
    pub fn combine(hidden: usize) -> usize {
        12 + 4 * hidden
    }
    /// A token moving to its destination: home, cache, position, slot, key, mask; its k expert
    /// ids and weights; its residual.
    pub fn token_move(hidden: usize, top_k: usize) -> usize {
        32 + 8 * top_k + 4 * hidden
    }
    /// A final hidden state sent home: slot, row.
    pub fn final_row(hidden: usize) -> usize {
        4 + 4 * hidden
    }
    /// One KV entry of a moving token's layer: home, cache, layer, position; keys and values.
    pub fn kv_entry(kv_floats: usize) -> usize {
        20 + 4 * kv_floats
    }
}

/// Rows a token held on `me` sends in one layer when its combine lands on `d`: its residual when
/// `d` is another rank, and per expert (run on `d` when a replica is there, else here, else
/// elsewhere) its dispatch unless it runs here or on `d`, and its combine unless it runs on `d`.
/// `replicas[e]` are the ranks holding expert e.
pub fn rows_sent(replicas: &[Vec<usize>], ids: &[u32], me: usize, d: usize) -> usize {
    let mut n = usize::from(d != me);
    for &e in ids {
        let rs = &replicas[e as usize];
        if rs.contains(&d) {
            continue;
        }
        n += if rs.contains(&me) { 1 } else { 2 };
    }
    n
}

/// The rank that runs one of a token's experts (`replicas`: its ranks) on the affinity path
/// when the token is held on `me` and combines on `d`: the replica on `d`, else the one here, else
/// the one `pick` chooses (an index into `replicas`).
pub fn expert_rank(replicas: &[usize], me: usize, d: usize, pick: impl FnOnce(&[usize]) -> usize) -> usize {
    if replicas.contains(&d) {
        d
    } else if replicas.contains(&me) {
        me
    } else {
        replicas[pick(replicas)]
    }
}

/// Where the combine of a token held on `me` lands on the affinity path: home for a pinned token
/// (a prompt chunk, or a sequence whose KV copies are not complete); here when its primary expert
/// (`ids[0]`) has a replica here; else the replica `pick` chooses among those in `group` (home
/// when there is none) — unless staying sends strictly fewer rows in this layer ([`rows_sent`]).
pub fn destination(
    replicas: &[Vec<usize>],
    ids: &[u32],
    me: usize,
    home: usize,
    group: std::ops::Range<usize>,
    pinned: bool,
    pick: impl FnOnce(&[usize]) -> usize,
) -> usize {
    if pinned {
        return home;
    }
    let primary = &replicas[ids[0] as usize];
    if primary.contains(&me) {
        return me;
    }
    let inside: Vec<usize> = primary.iter().copied().filter(|r| group.contains(r)).collect();
    let target = if inside.is_empty() { home } else { inside[pick(&inside)] };
    if rows_sent(replicas, ids, me, me) < rows_sent(replicas, ids, me, target) { me } else { target }
}

/// The coherence group of `rank` among `ranks` in groups of `group` (0: all).
pub fn coherence_group(rank: usize, ranks: usize, group: usize) -> std::ops::Range<usize> {
    let g = if group == 0 { ranks } else { group.min(ranks) }.max(1);
    let start = rank / g * g;
    start..(start + g).min(ranks)
}

/// What a data path costs on a trace.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PathScore {
    /// (token, MoE layer) pairs scored.
    pub token_layers: u64,
    /// Bytes sent to other ranks, all of them (KV included).
    pub bytes: f64,
    /// Of them, the KV exchange's.
    pub kv_bytes: f64,
    pub local_rows: u64,
    pub rows: u64,
    /// Tokens whose combine landed on another rank than the one holding them.
    pub moved: u64,
}

impl PathScore {
    pub fn bytes_per_token_layer(&self) -> f64 {
        self.bytes / self.token_layers.max(1) as f64
    }
    pub fn kv_bytes_per_token_layer(&self) -> f64 {
        self.kv_bytes / self.token_layers.max(1) as f64
    }
    pub fn local_share(&self) -> f64 {
        self.local_rows as f64 / self.rows.max(1) as f64
    }
    pub fn moved_per_token_layer(&self) -> f64 {
        self.moved as f64 / self.token_layers.max(1) as f64
    }
}

/// Scores `path` for `placement` on `trace` served as [`PathShape`] describes. Replicas: the one
/// on the token's rank, else on its destination, else the first.
pub fn score(trace: &RoutingTrace, placement: &Placement, path: PathKind, shape: &PathShape) -> Result<PathScore, PlacementError> {
    placement.validate()?;
    if trace.num_layers != placement.num_layers || trace.num_experts != placement.num_experts {
        return Err(PlacementError::Mismatch(format!(
            "trace has {} layers x {} experts, the placement {} x {}",
            trace.num_layers, trace.num_experts, placement.num_layers, placement.num_experts
        )));
    }
    let request = shape.prompt_tokens + shape.new_tokens;
    if request == 0 || shape.hidden == 0 {
        return Err(PlacementError::Invalid("a data path score needs a hidden size and tokens per request".into()));
    }
    let ranks = placement.num_ranks();
    let replicas: Vec<Vec<Vec<usize>>> = (0..placement.num_layers).map(|l| placement.replicas(l)).collect();
    let (h, k) = (shape.hidden, trace.top_k);
    let mut s = PathScore::default();
    // Requests: consecutive tokens of one sequence, `request` at a time.
    let mut starts = Vec::new();
    let mut t = 0;
    while t < trace.num_tokens() {
        let seq = trace.seq_id(t);
        let mut end = t;
        while end < trace.num_tokens() && trace.seq_id(end) == seq && end - t < request {
            end += 1;
        }
        starts.push((t, end));
        t = end;
    }
    for (j, &(a, b)) in starts.iter().enumerate() {
        let home = j % ranks;
        let group = coherence_group(home, ranks, if let PathKind::Affinity { group } = path { group } else { 0 });
        let peers = (group.len() - 1) as f64;
        for t in a..b {
            let pinned = t - a < shape.prompt_tokens;
            let mut holder = home;
            for (l, reps) in replicas.iter().enumerate() {
                let ids = trace.experts(t, l);
                s.token_layers += 1;
                s.rows += k as u64;
                match path {
                    PathKind::Home => {
                        for &e in ids {
                            let rs = &reps[e as usize];
                            if rs.contains(&home) {
                                s.local_rows += 1;
                            } else {
                                s.bytes += (wire::home_dispatch(h) + wire::home_combine(h)) as f64;
                            }
                        }
                    }
                    PathKind::Affinity { .. } => {
                        let me = holder;
                        let d = destination(reps, ids, me, home, group.clone(), pinned, |_| 0);
                        if d != me {
                            s.moved += 1;
                            s.bytes += wire::token_move(h, k) as f64;
                        }
                        for &e in ids {
                            let rs = &reps[e as usize];
                            let q = expert_rank(rs, me, d, |_| 0);
                            if q == d && d == me {
                                s.local_rows += 1;
                            }
                            if !(q == d && d != me) && q != me {
                                s.bytes += wire::dispatch(h) as f64;
                            }
                            if q != d {
                                s.bytes += wire::combine(h) as f64;
                            }
                        }
                        holder = d;
                    }
                }
            }
            if let PathKind::Affinity { .. } = path {
                if holder != home {
                    s.bytes += wire::final_row(h) as f64;
                }
                // Decoded tokens' entries one by one; prompt tokens' as a block (no header).
                let per_layer = if pinned { 4 * shape.kv_floats } else { wire::kv_entry(shape.kv_floats) };
                let kv = (per_layer * shape.kv_layers) as f64 * peers;
                s.kv_bytes += kv;
                s.bytes += kv;
            }
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Topology;
    use crate::placement::LayerPlacement;

    fn trace(ids: Vec<u32>, layers: usize, k: usize, experts: usize) -> RoutingTrace {
        let n = ids.len() / (layers * k);
        RoutingTrace { num_experts: experts, num_layers: layers, top_k: k, topk_ids: ids, topk_weights: None, seq_ids: Some(vec![0; n]) }
    }

    /// Two ranks, experts {0,1} | {2,3}, top-2, three layers; one decoded token whose layers use
    /// (2,0), (3,1), (1,0). Home (rank 0): layer 0 sends expert 2's row out and back, layer 1
    /// expert 3's, layer 2 nothing. Affinity: layer 0 moves to rank 1 (the primary's) and expert
    /// 0's output follows; layer 1 stays (3 is here) and expert 1's row goes out and back to rank
    /// 1; layer 2's primary is on rank 0: the token moves back, expert 0 runs there.
    #[test]
    fn hand_worked_bytes_on_both_paths() {
        let p = Placement::new(4, Topology::uniform(2, 1).unwrap(), vec![LayerPlacement { ranks: vec![vec![0, 1], vec![2, 3]] }; 3]);
        let t = trace(vec![2, 0, 3, 1, 1, 0], 3, 2, 4);
        let shape = PathShape { hidden: 8, kv_floats: 4, kv_layers: 2, prompt_tokens: 0, new_tokens: 1 };
        let home = score(&t, &p, PathKind::Home, &shape).unwrap();
        let (d, c) = (wire::home_dispatch(8) as f64, wire::home_combine(8) as f64);
        assert_eq!(home.bytes, 2.0 * (d + c));
        assert_eq!((home.local_rows, home.rows, home.moved), (4, 6, 0));
        let aff = score(&t, &p, PathKind::Affinity { group: 0 }, &shape).unwrap();
        let mv = wire::token_move(8, 2) as f64;
        let want = mv + wire::combine(8) as f64 // layer 0: move, expert 0's output
            + (wire::dispatch(8) + wire::combine(8)) as f64 // layer 1: expert 1 out and back
            + mv // layer 2: back to rank 0, both experts there
            + (2 * wire::kv_entry(4)) as f64; // KV of two layers to the one peer
        assert_eq!(aff.bytes, want);
        assert_eq!((aff.local_rows, aff.moved), (1, 2), "layer 1: expert 3 local; two moves");
        assert_eq!(aff.kv_bytes, (2 * wire::kv_entry(4)) as f64);
    }

    #[test]
    fn staying_wins_when_the_token_has_more_experts_here() {
        // Primary (expert 2) on rank 1, the other three on rank 0 (here).
        let reps = vec![vec![0], vec![0], vec![1], vec![0]];
        assert_eq!(destination(&reps, &[2, 0, 1, 3], 0, 0, 0..2, false, |_| 0), 0);
        assert_eq!(destination(&reps, &[2, 0], 0, 0, 0..2, false, |_| 0), 1, "a tie follows the primary");
        assert_eq!(destination(&reps, &[2, 0], 0, 0, 0..1, false, |_| 0), 0, "outside the group: home");
        assert_eq!(destination(&reps, &[2, 0], 0, 0, 0..2, true, |_| 0), 0, "pinned: home");
    }
}
