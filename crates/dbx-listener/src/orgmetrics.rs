//! Per-organization metrics, for "which customer is sending how much": points, batches and
//! bytes received, batches refused, and rate-limit pauses, each labelled `org`.
//!
//! The label policy lives here once, for every input (TCP and TLS connections, UDP, MQTT):
//! an organization's label is its `org_code`, given to the first `metrics.max_org_labels`
//! organizations that send, for the life of the process (a series never changes meaning);
//! every organization past the cap is counted under [`OTHER`], and so is one whose code is
//! literally `other`, so that the bucket is never ambiguous. Each metric therefore has at most
//! `max_org_labels + 1` series, whatever gateways send. Org codes are identifiers, not secrets
//! (MQTT topics carry them too). An input asks for an organization's [`OrgCounters`] once it
//! knows the organization (after the handshake, per datagram or message) and records through
//! those handles, which cost an atomic add each.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use ::metrics::{Counter, Histogram};
use uuid::Uuid;

use crate::metrics as m;
use dbx_core::sync::{read, write};

use crate::auth::AuthCache;

/// The label of every organization without one of its own.
pub const OTHER: &str = "other";

/// The per-organization metric handles of one label.
#[derive(Debug)]
pub struct OrgCounters {
    label: String,
    points: Counter,
    batches: Counter,
    bytes: Counter,
    rejections: Counter,
    rate_limit_wait: Histogram,
}

impl OrgCounters {
    fn new(label: &str) -> OrgCounters {
        OrgCounters {
            label: label.to_string(),
            points: m::org_counter(m::ORG_POINTS_RECEIVED_TOTAL, label),
            batches: m::org_counter(m::ORG_BATCHES_RECEIVED_TOTAL, label),
            bytes: m::org_counter(m::ORG_RECEIVED_BYTES_TOTAL, label),
            rejections: m::org_counter(m::ORG_REJECTIONS_TOTAL, label),
            rate_limit_wait: m::org_rate_limit_wait(label),
        }
    }

    /// The `org` label these handles record under.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Bytes received from the organization: a frame (with its length prefix), a datagram
    /// or an MQTT payload, whatever becomes of it.
    pub fn received_bytes(&self, n: usize) {
        self.bytes.increment(n as u64);
    }

    /// A batch of `points` points accepted into the pipeline.
    pub fn accepted(&self, points: usize) {
        self.batches.increment(1);
        self.points.increment(points as u64);
    }

    /// A batch refused: nacked (TCP, TLS, MQTT), or a datagram dropped for a reason of the
    /// organization's own (invalid, unknown aircraft or session, over its rate limit).
    pub fn rejected(&self) {
        self.rejections.increment(1);
    }

    /// Reads paused for the organization's rate limit.
    pub fn rate_limited(&self, wait: Duration) {
        self.rate_limit_wait.record(wait.as_secs_f64());
    }
}

/// The label policy and the handles of the labelled organizations.
#[derive(Debug)]
pub struct OrgMetrics {
    max_labels: usize,
    labelled: RwLock<HashMap<Uuid, Arc<OrgCounters>>>,
    /// Made on first use: no `other` series until something is counted there.
    other: OnceLock<Arc<OrgCounters>>,
}

impl OrgMetrics {
    /// At most `max_labels` organizations get a label of their own (`metrics.max_org_labels`).
    pub fn new(max_labels: usize) -> Arc<OrgMetrics> {
        Arc::new(OrgMetrics {
            max_labels,
            labelled: RwLock::new(HashMap::new()),
            other: OnceLock::new(),
        })
    }

    fn other(&self) -> Arc<OrgCounters> {
        self.other
            .get_or_init(|| Arc::new(OrgCounters::new(OTHER)))
            .clone()
    }

    /// The handles of organization `org`, whose code the auth cache knows.
    pub fn for_org(&self, org: Uuid, auth: &AuthCache) -> Arc<OrgCounters> {
        self.for_org_coded(org, || auth.snapshot().org_code(org).map(str::to_string))
    }

    /// [`OrgMetrics::for_org`] with the code looked up by `code` (only on a first sight).
    pub fn for_org_coded(
        &self,
        org: Uuid,
        code: impl FnOnce() -> Option<String>,
    ) -> Arc<OrgCounters> {
        if let Some(c) = read(&self.labelled).get(&org) {
            return c.clone();
        }
        let Some(code) = code().filter(|c| c != OTHER) else {
            return self.other();
        };
        let mut labelled = write(&self.labelled);
        if let Some(c) = labelled.get(&org) {
            return c.clone();
        }
        if labelled.len() >= self.max_labels {
            return self.other();
        }
        let counters = Arc::new(OrgCounters::new(&code));
        labelled.insert(org, counters.clone());
        m::org_labels(labelled.len());
        counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(c: &str) -> impl FnOnce() -> Option<String> + '_ {
        move || Some(c.to_string())
    }

    #[test]
    fn codes_label_the_first_organizations_and_the_rest_share_other() {
        let m = OrgMetrics::new(2);
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(m.for_org_coded(a, code("ACME")).label(), "ACME");
        assert_eq!(m.for_org_coded(b, code("GLOBEX")).label(), "GLOBEX");
        // Past the cap: the bucket, however often it sends.
        for _ in 0..3 {
            assert_eq!(m.for_org_coded(c, code("INITECH")).label(), OTHER);
        }
        // Labels stay: the code is not even looked up again.
        assert_eq!(m.for_org_coded(a, || panic!("looked up")).label(), "ACME");
        assert_eq!(m.labelled.read().unwrap().len(), 2);
    }

    #[test]
    fn an_unknown_organization_or_one_coded_other_is_counted_under_other() {
        let m = OrgMetrics::new(10);
        assert_eq!(m.for_org_coded(Uuid::new_v4(), || None).label(), OTHER);
        assert_eq!(m.for_org_coded(Uuid::new_v4(), code(OTHER)).label(), OTHER);
        assert!(m.labelled.read().unwrap().is_empty());
        // A cap of 0 puts everyone in the bucket.
        let none = OrgMetrics::new(0);
        assert_eq!(
            none.for_org_coded(Uuid::new_v4(), code("ACME")).label(),
            OTHER
        );
    }
}
