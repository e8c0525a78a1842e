//! Where a request goes and what happens when its rank fails: the rules the coordinator's
//! request tasks follow and the simulator checks (one implementation for both).
//!
//! A request lives on one rank (data-parallel attention). When that rank fails mid-request (it
//! died, or its group is being re-formed) the request continues on a live rank from where it
//! stopped — prompt + the tokens streamed so far — so the client sees one sequence. A request
//! ends only with its tokens, or a terminal status after [`MAX_ATTEMPTS`], never in silence.

use std::time::Duration;

/// Attempts (ranks tried) per request before it fails with a retryable status.
pub const MAX_ATTEMPTS: usize = 8;

/// How long a request waits for the cluster to serve again (a generation being formed) before an
/// attempt fails.
pub const WAIT_FOR_SERVING: Duration = Duration::from_secs(20);

/// The rank with the fewest outstanding tokens (ties: the lowest rank), among `(rank,
/// outstanding)`.
pub fn least_outstanding(ranks: impl IntoIterator<Item = (usize, u64)>) -> Option<usize> {
    ranks.into_iter().min_by_key(|&(r, o)| (o, r)).map(|(r, _)| r)
}

/// Why an attempt ended without the request finishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptFailure {
    /// The rank or its group failed (connection lost, worker gone, regrouping): try elsewhere.
    RankFailed,
    /// The cluster does not serve (no room, no workers): wait, then try again.
    NotServing,
    /// The request itself was refused (bad argument): final.
    Rejected,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Wait this long (and until the cluster serves), then continue on a live rank.
    Retry(Duration),
    /// End the request with the failure's status.
    Fail,
}

/// The retry rule: rank failures and outages are retried with a short growing pause, up to
/// [`MAX_ATTEMPTS`] in all; rejections never; requests that asked for prompt logits cannot be
/// continued from the middle, so they are retried only when nothing was streamed yet.
pub fn after_failure(attempt: usize, failure: AttemptFailure, streamed_tokens: usize, prompt_logits: bool) -> Next {
    if failure == AttemptFailure::Rejected || attempt + 1 >= MAX_ATTEMPTS || (prompt_logits && streamed_tokens > 0) {
        return Next::Fail;
    }
    Next::Retry(Duration::from_millis((50u64 << attempt.min(4)).min(800)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_outstanding_breaks_ties_by_rank() {
        assert_eq!(least_outstanding([(2, 5), (0, 3), (1, 3)]), Some(0));
        assert_eq!(least_outstanding([]), None);
    }

    #[test]
    fn rejections_are_final_and_attempts_bounded() {
        assert_eq!(after_failure(0, AttemptFailure::Rejected, 0, false), Next::Fail);
        assert!(matches!(after_failure(0, AttemptFailure::RankFailed, 3, false), Next::Retry(_)));
        assert_eq!(after_failure(MAX_ATTEMPTS - 1, AttemptFailure::RankFailed, 0, false), Next::Fail);
        assert_eq!(after_failure(0, AttemptFailure::RankFailed, 1, true), Next::Fail);
        assert!(matches!(after_failure(0, AttemptFailure::NotServing, 0, true), Next::Retry(_)));
    }
}
