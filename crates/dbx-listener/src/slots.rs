//! Connection slots: how many connections may exist, how many may be in their
//! handshake, and how many of those may come from one source address.
//!
//! Every accepted socket takes a slot of `max_connections` for its lifetime and, until
//! its key is accepted (or its refusal is written), a slot of `max_pending_handshakes`
//! and one of the `max_pending_per_ip` slots of its address. A socket that finds any of them full
//! is refused at once by the accept loop: no task, no TLS handshake, no read (see
//! [`crate::tcp`]). Pending slots are held for at most the handshake timeout, then
//! a refusal's write timeout and its one-second linger, so an address that
//! opens sockets and says nothing can hold at most `max_pending_per_ip` of them, and
//! everybody together at most `max_pending_handshakes`.
//!
//! Addresses: IPv4 addresses count one by one; IPv6 addresses by their /64 prefix (one
//! subscriber usually holds a whole /64); IPv4-mapped IPv6 addresses as IPv4. The
//! per-address table holds only addresses with a pending handshake, so it has at most
//! `max_pending_handshakes` entries of 24 bytes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics as m;
use dbx_core::sync::lock;

/// Why a connection was refused before its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `listener.max_connections` connections exist.
    MaxConnections,
    /// `listener.max_pending_handshakes` handshakes are under way.
    MaxPendingHandshakes,
    /// `listener.max_pending_per_ip` handshakes from this address are under way.
    MaxPendingPerIp,
}

impl Refusal {
    /// The `reason` label of `dbx_connections_refused_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxPendingHandshakes => "max_pending_handshakes",
            Refusal::MaxPendingPerIp => "max_pending_per_ip",
        }
    }

    /// The `msg` of the refusal frame sent on plain TCP.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "the server is at its connection limit; retry with backoff",
            Refusal::MaxPendingHandshakes => {
                "the server has too many handshakes under way; retry with backoff"
            }
            Refusal::MaxPendingPerIp => {
                "too many handshakes under way from your address; retry with backoff"
            }
        }
    }
}

/// How source addresses are counted: IPv4 whole, IPv6 by /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4(u32),
    V6Prefix(u64),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => Source::V4(u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => Source::V4(u32::from(v4)),
                None => Source::V6Prefix((u128::from(a) >> 64) as u64),
            },
        }
    }
}

/// The listener's slots, shared by the TCP and TLS accept loops.
#[derive(Debug, Clone)]
pub struct Slots {
    connections: Arc<Semaphore>,
    pending: Arc<Semaphore>,
    per_source: Arc<Mutex<HashMap<Source, usize>>>,
    max_per_source: usize,
}

/// The slots one connection holds; dropping it gives them back.
#[derive(Debug)]
pub struct Admitted {
    _connection: OwnedSemaphorePermit,
    pending: Option<PendingSlot>,
}

/// A pending-handshake slot (global and per address).
#[derive(Debug)]
struct PendingSlot {
    _permit: OwnedSemaphorePermit,
    source: Source,
    per_source: Arc<Mutex<HashMap<Source, usize>>>,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut map = lock(&self.per_source);
        if let Some(n) = map.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.source);
            }
        }
        m::pending_handshakes().decrement(1.0);
    }
}

impl Admitted {
    /// The handshake is over: the pending slots go back, the connection slot stays.
    pub fn established(&mut self) {
        self.pending = None;
    }
}

impl Slots {
    /// Slots for `max_connections`, `max_pending_handshakes`, `max_pending_per_ip`.
    pub fn new(max_connections: usize, max_pending: usize, max_per_source: usize) -> Self {
        m::pending_handshakes().set(0.0);
        Slots {
            connections: Arc::new(Semaphore::new(max_connections)),
            pending: Arc::new(Semaphore::new(max_pending)),
            per_source: Arc::new(Mutex::new(HashMap::new())),
            max_per_source,
        }
    }

    /// Takes the slots of a new connection from `ip`, or says which limit is reached.
    /// Never waits.
    pub fn admit(&self, ip: IpAddr) -> Result<Admitted, Refusal> {
        let connection = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::MaxConnections)?;
        let permit = self
            .pending
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::MaxPendingHandshakes)?;
        let source = Source::from(ip);
        {
            let mut map = lock(&self.per_source);
            let n = map.entry(source).or_insert(0);
            if *n >= self.max_per_source {
                return Err(Refusal::MaxPendingPerIp);
            }
            *n += 1;
        }
        m::pending_handshakes().increment(1.0);
        Ok(Admitted {
            _connection: connection,
            pending: Some(PendingSlot {
                _permit: permit,
                source,
                per_source: self.per_source.clone(),
            }),
        })
    }

    /// Connections holding a pending slot right now.
    pub fn pending(&self) -> usize {
        self.per_source
            .lock()
            .expect("pending per-source lock")
            .values()
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_limit_refuses_with_its_reason() {
        let slots = Slots::new(4, 3, 2);
        let mut a = slots.admit(ip("10.0.0.1")).unwrap();
        let _b = slots.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            slots.admit(ip("10.0.0.1")).unwrap_err(),
            Refusal::MaxPendingPerIp
        );
        let _c = slots.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(
            slots.admit(ip("10.0.0.3")).unwrap_err(),
            Refusal::MaxPendingHandshakes
        );
        // An established connection frees its pending slots, keeps its connection slot.
        a.established();
        assert_eq!(slots.pending(), 2);
        let _d = slots.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            slots.admit(ip("10.0.0.4")).unwrap_err(),
            Refusal::MaxConnections
        );
        drop(a);
        assert!(slots.per_source.lock().unwrap().len() <= 2);
    }

    #[test]
    fn ipv6_counts_by_64_prefix_and_mapped_v4_as_v4() {
        let slots = Slots::new(10, 10, 1);
        let _a = slots.admit(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(
            slots.admit(ip("2001:db8:1:2::ffff")).unwrap_err(),
            Refusal::MaxPendingPerIp
        );
        let _b = slots.admit(ip("2001:db8:1:3::1")).unwrap();
        let _c = slots.admit(ip("192.0.2.7")).unwrap();
        assert_eq!(
            slots.admit(ip("::ffff:192.0.2.7")).unwrap_err(),
            Refusal::MaxPendingPerIp
        );
    }

    #[test]
    fn the_table_forgets_addresses_without_pending_handshakes() {
        let slots = Slots::new(10, 10, 5);
        for i in 0..5 {
            drop(slots.admit(IpAddr::from([10, 0, 0, i])).unwrap());
        }
        assert!(slots.per_source.lock().unwrap().is_empty());
    }
}
