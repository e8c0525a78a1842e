//! The bound on requests the coordinator holds at once (`--max-queued-requests`): waiting for the
//! cluster, queued on a worker, or streaming. Past it a request is refused at once
//! (RESOURCE_EXHAUSTED on gRPC, 429 over HTTP) rather than growing every queue and every latency.
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub(crate) struct Admission {
    limit: usize,
    held: Arc<AtomicUsize>,
}

/// One admitted request; its place is given back on drop (however the request ends).
#[derive(Debug)]
pub(crate) struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Admission {
    pub fn new(limit: usize) -> Self {
        Admission { limit, held: Arc::new(AtomicUsize::new(0)) }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A place for one more request, unless `limit` are held.
    pub fn try_admit(&self) -> Option<Permit> {
        let r = self.held.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < self.limit).then_some(n + 1));
        r.ok().map(|_| Permit(self.held.clone()))
    }
}
