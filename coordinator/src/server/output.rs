//! The text of one request's output as it streams: decoded incrementally (a byte-level
//! tokenizer splits characters over tokens, so a token alone may decode to half a character) and
//! cut at the first stop string, which may span any number of tokens. Text that could still turn
//! out to be the start of a stop string is held back until it is known not to be.
use worker::tokenizer::Tokenizer;

/// Stop strings a request may carry at most, and the longest one (bytes): they bound the work
/// of every token (OpenAI allows 4).
pub const MAX_STOPS: usize = 4;
pub const MAX_STOP_BYTES: usize = 256;

/// Text that may be sent now, and whether a stop string ended the output (then `text` is what
/// came before it).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Piece {
    pub text: String,
    pub stopped: bool,
}

pub(crate) struct OutputText {
    ids: Vec<u32>,
    /// `ids[prefix..read]` is the window already turned into text; decoding from `prefix` (not
    /// from `read`) gives the tokenizer the context it needs to place spaces and join bytes.
    prefix: usize,
    read: usize,
    /// Everything decoded so far, and how many of its bytes were handed out.
    text: String,
    sent: usize,
    stops: Vec<String>,
    stopped: bool,
}

impl OutputText {
    pub fn new(stops: Vec<String>) -> Self {
        OutputText { ids: vec![], prefix: 0, read: 0, text: String::new(), sent: 0, stops, stopped: false }
    }

    /// Adds generated token `id`.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Piece {
        if self.stopped {
            return Piece { text: String::new(), stopped: true };
        }
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read]).unwrap_or_default();
        let after = tok.decode(&self.ids[self.prefix..]).unwrap_or_default();
        // An incomplete UTF-8 sequence decodes to U+FFFD: wait for the token that completes it.
        if after.len() > before.len()
            && !after.ends_with('\u{FFFD}')
            && let Some(new) = after.get(before.len()..)
        {
            self.text.push_str(new);
            self.prefix = self.read;
            self.read = self.ids.len();
        }
        self.release(false)
    }

    /// The output ended (a stop token or the token budget): everything still held back, with
    /// incomplete characters as U+FFFD.
    pub fn finish(&mut self, tok: &Tokenizer) -> Piece {
        if self.stopped {
            return Piece { text: String::new(), stopped: true };
        }
        let before = tok.decode(&self.ids[self.prefix..self.read]).unwrap_or_default();
        let after = tok.decode(&self.ids[self.prefix..]).unwrap_or_default();
        if after.len() > before.len() {
            self.text.push_str(after.get(before.len()..).unwrap_or(&after));
        }
        self.read = self.ids.len();
        self.release(true)
    }

    fn release(&mut self, last: bool) -> Piece {
        // A match starts at or after `sent`: everything before it was released only once no
        // stop string could begin there (see `held_back`).
        let unsent = &self.text[self.sent..];
        if let Some(at) = self.stops.iter().filter_map(|s| unsent.find(s.as_str())).min() {
            let text = unsent[..at].to_string();
            self.sent = self.text.len();
            self.stopped = true;
            return Piece { text, stopped: true };
        }
        let cut = if last { self.text.len() } else { (self.text.len() - self.held_back()).max(self.sent) };
        let text = self.text[self.sent..cut].to_string();
        self.sent = cut;
        Piece { text, stopped: false }
    }

    /// Bytes at the end of the text that are the beginning of some stop string.
    fn held_back(&self) -> usize {
        self.stops
            .iter()
            .flat_map(|s| s.char_indices().map(|(i, _)| i).filter(|&i| i > 0).filter(|&i| self.text.ends_with(&s[..i])))
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3_moe");
        Tokenizer::from_dir(&dir).unwrap().unwrap()
    }

    /// Feeds `text`'s tokens one by one; what was sent and whether it stopped.
    fn feed(stops: &[&str], text: &str) -> (Vec<String>, bool) {
        let t = tok();
        let mut out = OutputText::new(stops.iter().map(|s| s.to_string()).collect());
        let ids = t.encode(text).unwrap();
        let mut sent = vec![];
        for (i, id) in ids.iter().enumerate() {
            let mut p = out.push(&t, *id);
            if !p.stopped && i + 1 == ids.len() {
                let rest = out.finish(&t);
                p.text.push_str(&rest.text);
                p.stopped = rest.stopped;
            }
            sent.push(p.text);
            if p.stopped {
                return (sent, true);
            }
        }
        (sent, false)
    }

    #[test]
    fn multi_byte_characters_are_sent_whole() {
        let (sent, stopped) = feed(&[], "a€b");
        assert!(!stopped);
        assert_eq!(sent.concat(), "a€b");
        // The euro sign is three byte tokens: nothing is sent until its last one.
        assert_eq!(sent, vec!["a", "", "", "€", "b"]);
    }

    #[test]
    fn a_stop_string_across_tokens_is_cut_and_never_sent() {
        let (sent, stopped) = feed(&["lo w"], "hello world");
        assert!(stopped);
        assert_eq!(sent.concat(), "hel");
        // "l" and "lo" might start the stop string: held back until the match is known.
        let (sent, stopped) = feed(&["lox"], "hello world");
        assert!(!stopped);
        assert_eq!(sent.concat(), "hello world");
        assert_eq!(sent[2], "", "the first l could begin `lox`");
    }

    #[test]
    fn a_stop_string_at_the_start_sends_nothing() {
        let (sent, stopped) = feed(&["x", "he"], "hello");
        assert!(stopped);
        assert_eq!(sent.concat(), "");
    }
}
