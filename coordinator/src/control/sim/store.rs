//! The simulated state store: keys with revisions, compare-and-swap, and leases that expire at
//! simulated time unless kept alive (the etcd semantics the coordinator relies on).

use std::collections::BTreeMap;

use crate::control::record::GenerationRecord;

/// What a key holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    /// The leader key: coordinator index and incarnation.
    Leader(usize, u64),
    Gen(Box<GenerationRecord>),
    /// The highest (generation, epoch) a leader is carrying out or has carried out.
    Reserved(u64, u64),
}

#[derive(Debug, Clone)]
struct Kv {
    val: Val,
    mod_rev: u64,
    lease: Option<u64>,
}

#[derive(Debug, Default)]
pub struct Store {
    keys: BTreeMap<&'static str, Kv>,
    /// Lease id -> (expiry time, ttl).
    leases: BTreeMap<u64, (u64, u64)>,
    rev: u64,
    next_lease: u64,
}

impl Store {
    /// Drops the leases expired at `now` and the keys attached to them.
    pub fn expire(&mut self, now: u64) {
        let dead: Vec<u64> = self.leases.iter().filter(|(_, (exp, _))| *exp <= now).map(|(l, _)| *l).collect();
        if dead.is_empty() {
            return;
        }
        for l in &dead {
            self.leases.remove(l);
        }
        self.keys.retain(|_, kv| kv.lease.is_none_or(|l| !dead.contains(&l)));
        self.rev += 1;
    }

    pub fn grant(&mut self, now: u64, ttl: u64) -> u64 {
        self.next_lease += 1;
        self.leases.insert(self.next_lease, (now + ttl, ttl));
        self.next_lease
    }

    /// A keep-alive reaching the store: `false` when the lease is already gone.
    pub fn keep_alive(&mut self, lease: u64, now: u64) -> bool {
        self.expire(now);
        match self.leases.get_mut(&lease) {
            Some((exp, ttl)) => {
                *exp = now + *ttl;
                true
            }
            None => false,
        }
    }

    pub fn lease_valid(&self, lease: u64, now: u64) -> bool {
        self.leases.get(&lease).is_some_and(|(exp, _)| *exp > now)
    }

    /// The value and its revision (0: absent).
    pub fn get(&self, key: &str) -> (Option<&Val>, u64) {
        match self.keys.get(key) {
            Some(kv) => (Some(&kv.val), kv.mod_rev),
            None => (None, 0),
        }
    }

    /// Writes `val` if the key is at revision `expected` (0: absent); `Err(current revision)`
    /// otherwise, or when the lease is gone.
    pub fn cas(&mut self, key: &'static str, expected: u64, val: Val, lease: Option<u64>, now: u64) -> Result<u64, u64> {
        self.expire(now);
        let (_, cur) = self.get(key);
        if cur != expected || lease.is_some_and(|l| !self.lease_valid(l, now)) {
            return Err(cur);
        }
        self.rev += 1;
        self.keys.insert(key, Kv { val, mod_rev: self.rev, lease });
        Ok(self.rev)
    }
}
