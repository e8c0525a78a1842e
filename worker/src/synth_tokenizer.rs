#![forbid(unsafe_code)]
//! A byte-level BPE tokenizer for generated checkpoints (`tokenizer.json` and
//! `tokenizer_config.json`, as Hugging Face writes them), so that a generated checkpoint is a
//! complete model directory: transformers' `AutoTokenizer`, this crate's [`crate::tokenizer`] and
//! other engines' converters (llama.cpp's `convert_hf_to_gguf.py`) take it as they take a
//! published one.
//!
//! The vocabulary is made, not trained: three special tokens (`<unk>`, `<s>`, `</s>` at ids 0, 1,
//! 2, the ids the generated `config.json` names), the 256 byte symbols of byte-level BPE, then
//! merges of lowercase letters (with or without the word-start space symbol `Ġ`) into ever longer
//! letter strings until the vocabulary is full. Its splits of real text are plausible but
//! meaningless, which is all a benchmark of random weights needs. The pre-tokenizer is the
//! Qwen2-style one (contractions, letters, single digits, punctuation runs, newlines, spaces),
//! the one the generated architectures ship with.

use serde_json::json;
use std::path::Path;

/// Ids of the special tokens (matching `bos_token_id` / `eos_token_id` of the generated config).
pub const UNK: u32 = 0;
pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
const SPECIALS: [&str; 3] = ["<unk>", "<s>", "</s>"];

/// Split pattern of the pre-tokenizer (Qwen2 family, written out here).
const SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Fewest tokens a generated vocabulary can have: the specials and the 256 byte symbols.
pub const MIN_VOCAB: usize = SPECIALS.len() + 256;

/// Byte-level BPE's printable stand-in for each byte: printable Latin-1 bytes stand for
/// themselves, the others (controls, space, …) for code points from U+0100 up, in byte order.
fn byte_symbols() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut next = 0x100u32;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                let c = char::from_u32(next).unwrap_or('?');
                next += 1;
                c
            }
        })
        .collect()
}

/// The vocabulary in id order and the merges in rank order for `vocab` tokens.
///
/// # Errors
/// A `vocab` below [`MIN_VOCAB`].
pub fn vocabulary(vocab: usize) -> Result<(Vec<String>, Vec<(String, String)>), String> {
    if vocab < MIN_VOCAB {
        return Err(format!("a byte-level BPE vocabulary needs at least {MIN_VOCAB} tokens, not {vocab}"));
    }
    let symbols = byte_symbols();
    let space = symbols[b' ' as usize].to_string();
    let letters: Vec<String> = (b'a'..=b'z').map(|b| (b as char).to_string()).collect();
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(symbols.iter().map(|c| c.to_string()));
    let mut known: std::collections::HashSet<String> = tokens.iter().cloned().collect();
    let mut merges = Vec::new();
    // Stems to extend, breadth first: the word-start space and single letters, then every token
    // made, each extended by one letter.
    let mut stems: std::collections::VecDeque<String> = std::iter::once(space).chain(letters.iter().cloned()).collect();
    'fill: while let Some(stem) = stems.pop_front() {
        for l in &letters {
            if tokens.len() >= vocab {
                break 'fill;
            }
            let t = format!("{stem}{l}");
            if known.insert(t.clone()) {
                merges.push((stem.clone(), l.clone()));
                tokens.push(t.clone());
                stems.push_back(t);
            }
        }
    }
    // Letters alone cannot fill an (absurdly) large vocabulary: the rest are unused placeholders.
    while tokens.len() < vocab {
        tokens.push(format!("<unused{}>", tokens.len()));
    }
    Ok((tokens, merges))
}

/// Write `tokenizer.json` and `tokenizer_config.json` for `vocab` tokens into `dir`.
pub fn write_tokenizer(dir: &Path, vocab: usize, max_len: usize) -> std::io::Result<()> {
    let (tokens, merges) = vocabulary(vocab).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    let added: Vec<_> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let vocab_map: serde_json::Map<String, serde_json::Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let merges: Vec<_> = merges.iter().map(|(a, b)| json!([a, b])).collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT}, "behavior": "Isolated", "invert": false},
            byte_level,
        ]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "", "end_of_word_suffix": "",
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab_map, "merges": merges,
        },
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tokenizer)?)?;
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": SPECIALS[UNK as usize], "bos_token": SPECIALS[BOS as usize], "eos_token": SPECIALS[EOS as usize],
        "add_bos_token": false, "add_eos_token": false, "clean_up_tokenization_spaces": false,
        "model_max_length": max_len,
    });
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabulary_is_full_consistent_and_refuses_too_small() {
        let (tokens, merges) = vocabulary(32000).unwrap();
        assert_eq!(tokens.len(), 32000);
        assert_eq!(tokens.iter().collect::<std::collections::HashSet<_>>().len(), 32000, "distinct tokens");
        let ids: std::collections::HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
        for (a, b) in &merges {
            // Every merge's parts exist before the token it makes.
            let made = ids[format!("{a}{b}").as_str()];
            assert!(ids[a.as_str()] < made && ids[b.as_str()] < made, "{a} + {b}");
        }
        assert_eq!(merges.len(), 32000 - MIN_VOCAB);
        assert!(vocabulary(MIN_VOCAB - 1).is_err());
        assert_eq!(vocabulary(MIN_VOCAB).unwrap().1.len(), 0);
    }

    #[test]
    fn written_tokenizer_round_trips_text_through_the_tokenizers_crate() {
        let dir = std::env::temp_dir().join(format!("switchyard-synth-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_tokenizer(&dir, 4096, 256).unwrap();
        let tok = crate::tokenizer::Tokenizer::from_dir(&dir).unwrap().expect("tokenizer.json written");
        assert_eq!(tok.vocab_size(), 4096);
        let text = "the quick brown fox, 42 times!\n\tdef f(x): return x's";
        let ids = tok.encode(text).unwrap();
        assert!(ids.iter().all(|&i| (MIN_VOCAB as u32..4096).contains(&i) || (3..MIN_VOCAB as u32).contains(&i)));
        assert!(ids.len() < text.len(), "merges apply: {} ids for {} bytes", ids.len(), text.len());
        assert_eq!(tok.decode(&ids).unwrap(), text);
        std::fs::remove_dir_all(&dir).ok();
    }
}
