//! Every fixture in tests/fixtures: logits and greedy tokens against transformers.

mod common;
use worker::model::{LoadOptions, LogitsMode, Model, SeqInput};
use worker::reference::{check_case, read_expected, rel_max_diff};

const TOL: f32 = 1e-4;

#[test]
fn fixtures_full_forward_and_greedy() {
    for dir in common::fixture_dirs() {
        let model = Model::load(&dir, &LoadOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let cases = read_expected(&dir.join("expected.safetensors")).expect("expected");
        assert!(!cases.is_empty());
        for c in &cases {
            let r = check_case(&model, c).expect("check");
            eprintln!("{} prompt {} len {} rel {:.2e} greedy {}", dir.display(), c.index, c.prompt.len(), r.logits_rel_diff, r.greedy_ok);
            assert!(r.logits_rel_diff < TOL, "{}: prompt {} logits rel diff {}", dir.display(), c.index, r.logits_rel_diff);
            assert!(r.greedy_ok, "{}: prompt {} greedy {:?} != {:?}", dir.display(), c.index, r.greedy, c.greedy);
        }
    }
}

#[test]
fn fixtures_cached_decode_matches_full_forward() {
    for dir in common::fixture_dirs() {
        let model = Model::load(&dir, &LoadOptions::default()).expect("load");
        let v = model.config.vocab_size;
        for c in read_expected(&dir.join("expected.safetensors")).expect("expected") {
            let n = c.prompt.len();
            let split = n / 2;
            let mut cache = model.new_cache();
            let mut got = model
                .forward(&mut [SeqInput { tokens: &c.prompt[..split], cache: &mut cache }], LogitsMode::All)
                .expect("prefill")
                .logits
                .remove(0);
            for i in split..n {
                let l = model
                    .forward(&mut [SeqInput { tokens: &c.prompt[i..i + 1], cache: &mut cache }], LogitsMode::All)
                    .expect("decode")
                    .logits
                    .remove(0);
                got.extend(l);
            }
            assert_eq!(got.len(), n * v);
            let d = rel_max_diff(&got, &c.logits);
            assert!(d < TOL, "{}: prompt {} cached decode rel diff {d}", dir.display(), c.index);
        }
    }
}

#[test]
fn fixtures_mixed_batch_equals_one_by_one() {
    for dir in common::fixture_dirs() {
        let model = Model::load(&dir, &LoadOptions::default()).expect("load");
        let cases = read_expected(&dir.join("expected.safetensors")).expect("expected");
        // Batch: all prompts at once (different lengths), each prefilled with a different split.
        let mut caches: Vec<_> = cases.iter().map(|_| model.new_cache()).collect();
        let firsts: Vec<&[u32]> = cases.iter().enumerate().map(|(i, c)| &c.prompt[..c.prompt.len() - i.min(c.prompt.len() - 1)]).collect();
        let mut seqs: Vec<SeqInput> =
            firsts.iter().zip(caches.iter_mut()).map(|(t, cache)| SeqInput { tokens: t, cache }).collect();
        let out = model.forward(&mut seqs, LogitsMode::All).expect("batch");
        let total: usize = firsts.iter().map(|f| f.len()).sum();
        assert_eq!(out.routing[0].n_tokens(), total);
        for (i, c) in cases.iter().enumerate() {
            let n = firsts[i].len();
            let v = model.config.vocab_size;
            let d = rel_max_diff(&out.logits[i], &c.logits[..n * v]);
            assert!(d < TOL, "{}: batched prompt {} rel diff {d}", dir.display(), i);
        }
        // Then decode the rest of every prompt in lockstep batches (sequences drop out as they finish).
        let mut pos: Vec<usize> = firsts.iter().map(|f| f.len()).collect();
        loop {
            let active: Vec<usize> = (0..cases.len()).filter(|&i| pos[i] < cases[i].prompt.len()).collect();
            if active.is_empty() {
                break;
            }
            let toks: Vec<Vec<u32>> = active.iter().map(|&i| vec![cases[i].prompt[pos[i]]]).collect();
            let mut cs: Vec<_> = caches.iter_mut().enumerate().filter(|(i, _)| active.contains(i)).map(|(_, c)| c).collect();
            let mut seqs: Vec<SeqInput> = toks.iter().zip(cs.iter_mut()).map(|(t, c)| SeqInput { tokens: t, cache: c }).collect();
            let out = model.forward(&mut seqs, LogitsMode::Last).expect("decode");
            let v = model.config.vocab_size;
            for (j, &i) in active.iter().enumerate() {
                let p = pos[i];
                let d = rel_max_diff(&out.logits[j], &cases[i].logits[p * v..(p + 1) * v]);
                assert!(d < TOL, "{}: batched decode prompt {i} pos {p} rel diff {d}", dir.display());
                pos[i] += 1;
            }
        }
    }
}
