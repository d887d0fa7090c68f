//! What an internal event did: [`capture_events`] runs a closure with a recorder and a
//! log subscriber of its own (this thread only, so tests in parallel do not see each
//! other's), and returns the metrics it moved and the log lines it wrote. The unit tests
//! of each crate's `events.rs` use it to check that one `emit` both counts and logs.

use std::io::Write;
use std::sync::{Arc, Mutex};

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;

/// One series as the recorder saw it: kind, name, labels, value.
type Series = (MetricKind, String, Vec<(String, String)>, DebugValue);

/// The metrics moved and the log written while a closure ran.
#[derive(Debug)]
pub struct Captured {
    metrics: Vec<Series>,
    log: String,
}

impl Captured {
    fn find(&self, kind: MetricKind, name: &str, labels: &[(&str, &str)]) -> Option<&DebugValue> {
        self.metrics
            .iter()
            .find(|(k, n, l, _)| {
                *k == kind
                    && n == name
                    && l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(lk, lv)| l.iter().any(|(k, v)| k == lk && v == lv))
            })
            .map(|(_, _, _, v)| v)
    }

    /// What counter `name` with exactly these labels counted (0 when untouched).
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        match self.find(MetricKind::Counter, name, labels) {
            Some(DebugValue::Counter(n)) => *n,
            _ => 0,
        }
    }

    /// The last value gauge `name` with exactly these labels was set to, if it was.
    pub fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        match self.find(MetricKind::Gauge, name, labels) {
            Some(DebugValue::Gauge(v)) => Some(v.into_inner()),
            _ => None,
        }
    }

    /// The values histogram `name` with exactly these labels recorded.
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        match self.find(MetricKind::Histogram, name, labels) {
            Some(DebugValue::Histogram(v)) => v.iter().map(|x| x.into_inner()).collect(),
            _ => Vec::new(),
        }
    }

    /// Every metric touched, as `(name, labels)` (to assert that nothing else moved).
    pub fn names(&self) -> Vec<(String, Vec<(String, String)>)> {
        self.metrics
            .iter()
            .map(|(_, n, l, _)| (n.clone(), l.clone()))
            .collect()
    }

    /// The log lines written (no colours, no timestamps), all levels down to TRACE.
    pub fn log(&self) -> &str {
        &self.log
    }

    /// The log lines that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<&str> {
        self.log.lines().filter(|l| l.contains(needle)).collect()
    }
}

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `f` with a local metrics recorder and a local tracing subscriber, and returns
/// its result with what it recorded and logged.
pub fn capture_events<R>(f: impl FnOnce() -> R) -> (R, Captured) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .without_time()
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, || {
        metrics::with_local_recorder(&recorder, f)
    });
    let metrics = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(ck, _, _, value)| {
            let (kind, key) = ck.into_parts();
            let labels = key
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            (kind, key.name().to_string(), labels, value)
        })
        .collect();
    let log =
        String::from_utf8_lossy(&buffer.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    (out, Captured { metrics, log })
}
