//! Unit tests of the group state machine: planning after losses and joins, the budget, NoRoom,
//! failed and stale regroups, drains, adoption by a new leader and the numbering floor.

use super::*;
use placement::solver::contiguous;

const LAYERS: usize = 2;
const EXPERTS: usize = 8;

fn settings(min_workers: usize, slots: usize, budget: Option<usize>, min_replicas: usize) -> GroupSettings {
    let topo = Topology::uniform(min_workers, 1).unwrap();
    let initial = contiguous::solve(LAYERS, EXPERTS, &topo, slots).unwrap();
    GroupSettings { min_workers, max_slots_per_rank: budget, min_replicas, initial }
}

fn register(g: &mut Group, n: usize) -> Vec<WorkerId> {
    (0..n).map(|i| g.register(format!("grpc{i}"), format!("tx{i}"), format!("node{i}"), 0, None).id).collect()
}

/// A group of `n` workers (min_workers = n, each expert once) with its first generation formed.
fn formed(n: usize, budget: Option<usize>) -> (Group, Vec<WorkerId>) {
    let mut g = Group::new(settings(n, EXPERTS.div_ceil(n), budget, 1)).unwrap();
    let ids = register(&mut g, n);
    let first = g.next_generation(None).expect("first generation");
    g.regroup_finished(first.number).unwrap();
    assert_eq!(g.serving(), Serving::Yes);
    (g, ids)
}

/// Every expert of every layer placed, no rank over `budget`, the placement valid.
fn check_placement(g: &Generation, budget: Option<usize>) {
    g.placement.validate().unwrap();
    assert_eq!(g.placement.num_ranks(), g.world());
    for (l, layer) in g.placement.layers.iter().enumerate() {
        for (r, slots) in layer.ranks.iter().enumerate() {
            if let Some(b) = budget {
                assert!(slots.len() <= b, "layer {l} rank {r}: {} slots over budget {b}", slots.len());
            }
        }
        assert!(g.placement.replicas(l).iter().all(|h| !h.is_empty()), "layer {l}: an expert without a slot");
    }
}

fn ids_of(g: &Generation) -> Vec<&str> {
    g.ranks.iter().map(|w| w.id.as_str()).collect()
}

#[test]
fn first_generation_waits_for_min_workers() {
    let mut g = Group::new(settings(3, 3, None, 1)).unwrap();
    register(&mut g, 2);
    assert!(g.next_generation(None).is_none());
    assert_eq!(g.serving(), Serving::WaitingForWorkers { have: 2, want: 3 });
    assert!(g.routable().is_empty());
    g.register("g".into(), "t".into(), "n".into(), 0, None);
    let first = g.next_generation(None).unwrap();
    assert_eq!(first.world(), 3);
    g.regroup_finished(first.number).unwrap();
    assert_eq!(g.routable().len(), 3);
}

#[test]
fn a_loss_plans_a_smaller_generation_in_order() {
    let (mut g, ids) = formed(4, Some(4));
    let before = g.active().unwrap().clone();
    assert!(g.lose(&ids[1]));
    assert!(!g.lose(&ids[1]), "a second loss of the same worker is no change");
    assert!(matches!(g.serving(), Serving::Regrouping { .. }));
    assert!(g.routable().is_empty(), "no routing while a rank is gone");
    let next = g.next_generation(None).unwrap();
    assert!(g.next_generation(None).is_none(), "one generation at a time");
    assert_eq!(next.world(), 3);
    assert!(next.number > before.number && next.epoch > before.epoch);
    assert_eq!(ids_of(&next), vec![ids[0].as_str(), ids[2].as_str(), ids[3].as_str()], "survivors keep their order");
    check_placement(&next, Some(4));
    g.regroup_finished(next.number).unwrap();
    assert_eq!(g.serving(), Serving::Yes);
    assert_eq!(g.active().unwrap().number, next.number);
    assert_eq!(g.generations_formed(), 2);
}

#[test]
fn a_joiner_comes_last() {
    let (mut g, ids) = formed(3, Some(3));
    let j = g.register("j".into(), "tj".into(), "nj".into(), 0, None).id;
    assert_eq!(g.spare_workers(), 1);
    assert_eq!(g.serving(), Serving::Yes, "a join being formed does not stop serving");
    let next = g.next_generation(None).unwrap();
    assert_eq!(ids_of(&next), vec![ids[0].as_str(), ids[1].as_str(), ids[2].as_str(), j.as_str()]);
    check_placement(&next, Some(3));
    g.regroup_finished(next.number).unwrap();
    assert_eq!(g.spare_workers(), 0);
}

#[test]
fn no_room_names_the_missing_experts_and_a_join_resolves_it() {
    // 4 ranks x 2 slots hold the 8 experts exactly once; with a budget of 2, 3 ranks cannot.
    let (mut g, ids) = formed(4, Some(2));
    g.lose(&ids[0]);
    assert!(g.next_generation(None).is_none());
    let Serving::NoRoom { missing } = g.serving() else { panic!("expected NoRoom, got {:?}", g.serving()) };
    assert_eq!(missing.len(), LAYERS * (EXPERTS - 3 * 2), "two experts per layer have no slot");
    assert!(missing.iter().all(|&(l, e)| l < LAYERS && e < EXPERTS));
    assert!(g.serving().reason().contains("experts missing"));
    assert!(g.routable().is_empty());
    g.register("j".into(), "tj".into(), "nj".into(), 0, None);
    let next = g.next_generation(None).expect("a join resolves NoRoom");
    assert_eq!(next.world(), 4);
    check_placement(&next, Some(2));
    g.regroup_finished(next.number).unwrap();
    assert_eq!(g.serving(), Serving::Yes);
}

#[test]
fn a_failed_regroup_replans_without_the_failed() {
    let (mut g, ids) = formed(4, Some(4));
    g.lose(&ids[3]);
    let next = g.next_generation(None).unwrap();
    g.regroup_abandoned(next.number, std::slice::from_ref(&ids[2])).unwrap();
    assert!(g.worker(&ids[2]).is_none(), "a worker that failed to join counts as lost");
    let again = g.next_generation(None).unwrap();
    assert!(again.number > next.number);
    assert_eq!(ids_of(&again), vec![ids[0].as_str(), ids[1].as_str()]);
    check_placement(&again, Some(4));
    g.regroup_finished(again.number).unwrap();
    assert_eq!(g.serving(), Serving::Yes);
}

#[test]
fn a_stale_finish_is_refused() {
    let (mut g, ids) = formed(3, None);
    let active = g.active().unwrap().number;
    assert!(matches!(g.regroup_finished(active), Err(ControlError::Stale { .. })), "nothing pending");
    g.lose(&ids[0]);
    let next = g.next_generation(None).unwrap();
    assert!(matches!(g.regroup_finished(next.number - 1), Err(ControlError::Stale { .. })));
    assert_eq!(g.pending().map(|p| p.number), Some(next.number), "a stale finish leaves the pending one");
    g.regroup_finished(next.number).unwrap();
}

#[test]
fn drain_needs_room_on_the_others() {
    let (mut g, ids) = formed(4, Some(2));
    assert!(matches!(g.drain(&ids[1]), Err(ControlError::NoRoom { .. })), "3 x 2 slots cannot hold 8 experts");
    assert!(!g.is_draining(&ids[1]));
    assert!(matches!(g.drain("nobody"), Err(ControlError::UnknownWorker(_))));
    let (mut g, ids) = formed(4, Some(3));
    g.drain(&ids[1]).unwrap();
    assert!(g.is_draining(&ids[1]));
    assert_eq!(g.routable().len(), 3, "a draining rank takes no new requests");
    let next = g.next_generation(None).unwrap();
    assert_eq!(ids_of(&next), vec![ids[0].as_str(), ids[2].as_str(), ids[3].as_str()]);
    check_placement(&next, Some(3));
}

#[test]
fn adopting_a_generation_with_a_dead_member_plans_at_once_above_it() {
    let (old, ids) = formed(4, Some(3));
    let mut recorded = old.active().unwrap().clone();
    recorded.number = 41;
    recorded.epoch = 77;
    let mut g = Group::new(settings(4, 2, Some(3), 1)).unwrap();
    let alive: Vec<WorkerId> = vec![ids[0].clone(), ids[2].clone(), ids[3].clone()];
    g.adopt(recorded, &alive);
    assert!(matches!(g.serving(), Serving::Regrouping { .. }));
    let next = g.next_generation(None).expect("a dead member calls for a new generation");
    assert!(next.number > 41 && next.epoch > 77);
    assert_eq!(ids_of(&next), alive.iter().map(String::as_str).collect::<Vec<_>>());
    check_placement(&next, Some(3));
    // New registrations do not reuse the recorded ids.
    let j = g.register("j".into(), "tj".into(), "nj".into(), 0, None).id;
    assert!(!ids.contains(&j));
}

#[test]
fn adopting_a_whole_generation_serves_without_a_change() {
    let (old, ids) = formed(3, None);
    let recorded = old.active().unwrap().clone();
    let mut g = Group::new(settings(3, 3, None, 1)).unwrap();
    g.adopt(recorded.clone(), &ids);
    assert_eq!(g.serving(), Serving::Yes);
    assert!(g.next_generation(None).is_none());
    assert_eq!(g.active(), Some(&recorded));
}

#[test]
fn observed_numbers_are_a_floor() {
    let (mut g, ids) = formed(3, None);
    g.observe_generation(10, 20);
    g.observe_generation(5, 7); // lower reports do not lower the floor
    g.lose(&ids[0]);
    let next = g.next_generation(None).unwrap();
    assert_eq!((next.number, next.epoch), (11, 21));
}

#[test]
fn settings_are_checked() {
    let mut s = settings(2, 4, None, 1);
    s.min_workers = 3;
    assert!(matches!(Group::new(s), Err(ControlError::InvalidSettings(_))));
    assert!(matches!(Group::new(settings(2, 4, Some(3), 1)), Err(ControlError::InvalidSettings(_))));
    assert!(matches!(Group::new(settings(2, 4, None, 0)), Err(ControlError::InvalidSettings(_))));
}

#[test]
fn a_failed_join_reforms_the_survivors_that_left_the_active_generation() {
    // The survivors accepted generation 2 (they left 1); the joiner did not answer. The next
    // generation has the old composition, but must still be formed: the workers are no longer
    // in generation 1.
    let (mut g, ids) = formed(3, None);
    let active = g.active().unwrap().number;
    let j = g.register("j".into(), "tj".into(), "nj".into(), 0, None).id;
    let next = g.next_generation(None).unwrap();
    g.regroup_abandoned(next.number, std::slice::from_ref(&j)).unwrap();
    assert!(!g.serving().is_serving(), "the survivors left generation {active}");
    assert!(g.routable().is_empty());
    let again = g.next_generation(None).expect("the survivors are re-formed");
    assert!(again.number > next.number);
    assert_eq!(ids_of(&again), ids.iter().map(String::as_str).collect::<Vec<_>>());
    g.regroup_finished(again.number).unwrap();
    assert_eq!(g.serving(), Serving::Yes);
}

/// With `min_replicas 2`, losing a rank serves again with what the survivors hold (no rank gains
/// an expert), and the next generation — same members — restores the floor.
#[test]
fn a_loss_with_replicas_serves_first_and_restores_the_floor_next() {
    let topo = Topology::uniform(4, 1).unwrap();
    let mut initial = contiguous::solve(LAYERS, EXPERTS, &topo, 4).unwrap();
    placement::solver::ensure_min_replicas(&mut initial, 2, &[]).unwrap();
    assert!(placement::solver::min_replica_count(&initial) >= 2);
    let mut g = Group::new(GroupSettings { min_workers: 4, max_slots_per_rank: Some(8), min_replicas: 2, initial }).unwrap();
    let ids = register(&mut g, 4);
    let first = g.next_generation(None).unwrap();
    g.regroup_finished(first.number).unwrap();
    g.lose(&ids[1]);
    let quick = g.next_generation(None).expect("a generation over the survivors");
    check_placement(&quick, Some(8));
    assert_eq!(quick.world(), 3);
    for (r, w) in quick.ranks.iter().enumerate() {
        let old = first.rank_of(&w.id).unwrap();
        for (l, layer) in quick.placement.layers.iter().enumerate() {
            for e in &layer.ranks[r] {
                assert!(first.placement.layers[l].ranks[old].contains(e), "{} gained layer {l} expert {e} before serving", w.id);
            }
        }
    }
    assert!(g.next_generation(None).is_none(), "one at a time");
    g.regroup_finished(quick.number).unwrap();
    assert_eq!(g.serving(), Serving::Yes);
    let restore = g.next_generation(None).expect("the replica floor restored next");
    assert_eq!(ids_of(&restore), ids_of(&quick));
    assert!(restore.number > quick.number && restore.epoch > quick.epoch);
    assert!(placement::solver::min_replica_count(&restore.placement) >= 2, "floor not restored");
    check_placement(&restore, Some(8));
    g.regroup_finished(restore.number).unwrap();
    assert!(g.next_generation(None).is_none(), "nothing left to do");
}

#[test]
fn a_worker_of_the_other_device_kind_is_refused() {
    let mut g = Group::new(settings(2, EXPERTS / 2, None, 1)).unwrap();
    register(&mut g, 2);
    assert_eq!(g.admits(0, None), Ok(()));
    let err = g.admits(1, None).expect_err("a GPU worker beside CPU workers");
    assert_eq!(err.code(), "CONTROL_MIXED_COMPUTE");
    assert_eq!(err.to_status().code(), tonic::Code::FailedPrecondition);
    assert!(err.to_string().contains("computing on GPUs cannot join a group computing on the CPU"), "{err}");
    // Alone, a member may come back as anything; an empty group takes either kind.
    let mut solo = Group::new(settings(2, EXPERTS / 2, None, 1)).unwrap();
    let id = solo.register("g".into(), "t".into(), "n".into(), 1, None).id;
    assert_eq!(solo.admits(1, None), Ok(()));
    assert!(solo.admits(0, None).is_err());
    assert_eq!(solo.admits(0, Some(&id)), Ok(()), "the member itself is not its own obstacle");
}
