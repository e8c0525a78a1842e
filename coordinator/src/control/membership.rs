//! A worker's side of membership: when it registers with the leader (again), with which id, and
//! which membership key it must remove. `switchyard worker` (`crate::registration`) runs these
//! rules on the wall clock; the simulator's workers run them on the simulated clock.
//!
//! The rules: a new process registers until a leader accepts it (every `retry_ms`). A member
//! that has heard no health poll for `silence_ms` registers again with the id it was given — the
//! leader may have lost it (failed polls during a pause) while its lease still ran; a leader that
//! still has it answers with the same id, so a silence that was only a leader change costs
//! nothing. A member whose lease lapsed registers again the same way under a new lease. When a
//! leader answers with another id, the key of the old one is removed (a later leader must not
//! take the process over twice).

/// A worker's membership state; times are milliseconds on the caller's clock.
#[derive(Debug, Clone)]
pub struct Membership {
    id: Option<String>,
    silence_ms: u64,
    retry_ms: u64,
    last_heard: u64,
    last_attempt: Option<u64>,
}

impl Membership {
    pub fn new(silence_ms: u64, retry_ms: u64) -> Self {
        Membership { id: None, silence_ms, retry_ms, last_heard: 0, last_attempt: None }
    }

    /// The id a leader gave this process.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// Whether to register now; `Some(previous id)` when so.
    pub fn due(&self, now: u64) -> Option<Option<&str>> {
        if self.last_attempt.is_some_and(|t| now.saturating_sub(t) < self.retry_ms) {
            return None;
        }
        let silent = now.saturating_sub(self.last_heard) > self.silence_ms;
        (self.id.is_none() || silent).then_some(self.id.as_deref())
    }

    /// A registration was sent at `now`.
    pub fn attempted(&mut self, now: u64) {
        self.last_attempt = Some(now);
    }

    /// A leader accepted the registration as `id`. Returns the old id whose membership key must go.
    pub fn registered(&mut self, id: String, now: u64) -> Option<String> {
        self.last_heard = now;
        self.last_attempt = None;
        self.id.replace(id).filter(|old| Some(old.as_str()) != self.id.as_deref())
    }

    /// A coordinator polled this worker's health at `now`.
    pub fn heard(&mut self, now: u64) {
        self.last_heard = self.last_heard.max(now);
    }

    /// The membership lease lapsed (a new one is granted): register again.
    pub fn lease_lapsed(&mut self) {
        self.last_heard = 0;
        self.last_attempt = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_until_accepted_then_again_after_silence_with_its_id() {
        let mut m = Membership::new(2500, 500);
        assert_eq!(m.due(0), Some(None));
        m.attempted(0);
        assert_eq!(m.due(100), None, "waits for the answer");
        assert_eq!(m.due(600), Some(None), "retries");
        assert_eq!(m.registered("w3".into(), 700), None);
        m.heard(2000);
        assert_eq!(m.due(4000), None);
        assert_eq!(m.due(4600), Some(Some("w3")));
        m.attempted(4600);
        assert_eq!(m.registered("w3".into(), 4650), None, "the same id: no key to remove");
        m.lease_lapsed();
        assert_eq!(m.due(4700), Some(Some("w3")));
        assert_eq!(m.registered("w9".into(), 4800).as_deref(), Some("w3"), "another id: the old key goes");
        assert_eq!(m.id(), Some("w9"));
    }
}
