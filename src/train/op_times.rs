//! Time per kind of op in the op-level step ([`super::direct_ops`]), for the benchmark's
//! `--op-times`: where a step's time goes, op by op. On CUDA each timed op is bracketed by two
//! events on Candle's stream, so nothing waits inside the step and the figures are device time
//! (including any gap in which the device waited for the host); on the CPU, whose ops finish
//! before they return, by the clock.
//!
//! Off unless [`enable`] turned it on for the calling thread; then each timed op costs two
//! events (or two clock reads).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Device;

/// A point in the step's timeline.
enum Mark {
    Clock(Instant),
    #[cfg(feature = "cuda")]
    Event(candle_core::cuda_backend::cudarc::driver::CudaEvent),
}

struct Recorder {
    device: Device,
    spans: Vec<(&'static str, Mark, Mark)>,
}

thread_local! {
    static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
}

/// Starts recording the timed ops this thread runs on `device`.
pub fn enable(device: &Device) {
    RECORDER.with(|r| {
        *r.borrow_mut() = Some(Recorder {
            device: device.clone(),
            spans: Vec::new(),
        })
    });
}

/// Stops recording and drops what was recorded.
pub fn disable() {
    RECORDER.with(|r| *r.borrow_mut() = None);
}

fn mark(device: &Device) -> Mark {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
        // Events created with timing on (cudarc's default turns it off).
        if let Ok(event) = dev
            .cuda_stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        {
            return Mark::Event(event);
        }
    }
    let _ = device;
    Mark::Clock(Instant::now())
}

/// Runs `f`, recording its time under `label` when recording is on.
pub(crate) fn timed<R>(label: &'static str, f: impl FnOnce() -> R) -> R {
    let device = RECORDER.with(|r| r.borrow().as_ref().map(|rec| rec.device.clone()));
    let Some(device) = device else {
        return f();
    };
    let start = mark(&device);
    let out = f();
    let end = mark(&device);
    RECORDER.with(|r| {
        if let Some(rec) = r.borrow_mut().as_mut() {
            rec.spans.push((label, start, end));
        }
    });
    out
}

/// Seconds between two marks (waiting for the device when they are events); `None` when the
/// two are of different kinds or the device cannot tell.
fn seconds(start: &Mark, end: &Mark) -> Option<f64> {
    match (start, end) {
        (Mark::Clock(a), Mark::Clock(b)) => Some(b.duration_since(*a).as_secs_f64()),
        #[cfg(feature = "cuda")]
        (Mark::Event(a), Mark::Event(b)) => a.elapsed_ms(b).ok().map(|ms| ms as f64 / 1e3),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Time recorded under one label.
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    pub label: &'static str,
    pub seconds: f64,
    pub calls: u64,
}

/// The totals recorded since [`enable`] or the last call, largest first, and starts afresh
/// (waits for the device to reach the last recorded op).
pub fn take() -> Vec<OpTime> {
    let spans = RECORDER.with(|r| {
        r.borrow_mut()
            .as_mut()
            .map(|rec| std::mem::take(&mut rec.spans))
            .unwrap_or_default()
    });
    let mut totals: BTreeMap<&'static str, (f64, u64)> = BTreeMap::new();
    for (label, start, end) in &spans {
        let entry = totals.entry(label).or_default();
        entry.0 += seconds(start, end).unwrap_or(0.0);
        entry.1 += 1;
    }
    let mut out: Vec<OpTime> = totals
        .into_iter()
        .map(|(label, (seconds, calls))| OpTime {
            label,
            seconds,
            calls,
        })
        .collect();
    out.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn records_only_when_enabled_and_sums_by_label() {
        timed("before", || ());
        enable(&Device::Cpu);
        for _ in 0..3 {
            timed("sleep", || std::thread::sleep(Duration::from_millis(2)));
        }
        let v = timed("value", || 7);
        assert_eq!(v, 7);
        let got = take();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!((got[0].label, got[0].calls), ("sleep", 3));
        assert!(got[0].seconds >= 0.006, "{got:?}");
        assert_eq!((got[1].label, got[1].calls), ("value", 1));
        // Taken: the next totals start afresh; disabled: nothing is recorded.
        assert!(take().is_empty());
        disable();
        timed("after", || ());
        enable(&Device::Cpu);
        assert!(take().is_empty());
        disable();
    }
}
