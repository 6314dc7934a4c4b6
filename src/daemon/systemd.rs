//! The systemd service protocol (`Type=notify`): READY=1 once the listeners are bound and
//! recovery is done, STATUS= lines with queue counts as they change, WATCHDOG=1 keep-alives
//! at half of `WatchdogSec` — sent only while the scheduler's event loop answers — and
//! STOPPING=1 when shutdown begins. Without `NOTIFY_SOCKET` every call does nothing.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::sched::SchedHandle;
use crate::spec::JobState;

/// One notification, e.g. `["READY=1", "STATUS=..."]`. The datagram is sent without
/// blocking: a notify socket nobody drains must never stall the daemon (a blocking send, as
/// the `sd-notify` crate does, hung shutdown in tests). `NOTIFY_SOCKET` stays in our
/// environment for later notifications; jobs never inherit it (their environment is cleared).
fn send(lines: &[&str]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let msg: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let result = (|| {
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let sock = UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        let addr = match bytes.strip_prefix(b"@") {
            // An abstract socket (systemd uses these in containers).
            Some(name) => {
                <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name)?
            }
            None => SocketAddr::from_pathname(&path)?,
        };
        sock.send_to_addr(msg.as_bytes(), &addr).map(|_| ())
    })();
    if let Err(e) = result {
        debug!(error = %e, "cannot notify systemd");
    }
}

/// Tells systemd the daemon is ready.
pub fn ready(status: &str) {
    send(&["READY=1", &format!("STATUS={status}")]);
}

/// Tells systemd the daemon is stopping.
pub fn stopping() {
    send(&["STOPPING=1", "STATUS=stopping: checkpointing running jobs"]);
}

/// Tells systemd the daemon is reloading (a restart in place); READY=1 from the next image
/// ends it.
pub fn reloading() {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000
    });
    send(&[
        "RELOADING=1",
        &format!("MONOTONIC_USEC={now}"),
        "STATUS=restarting in place: running jobs keep running",
    ]);
}

/// A one-line status: "3 running, 12 queued, 2 interrupted".
pub fn status_line(sched: &SchedHandle) -> String {
    let view = sched.view();
    // Counted once per view (a scan of every job per change used to cost more than planning).
    let count = |s: JobState| {
        view.counts
            .iter()
            .find(|(state, _)| *state == s)
            .map_or(0, |(_, n)| *n)
    };
    let running = count(JobState::Running) + count(JobState::Starting);
    let mut parts = vec![
        format!("{running} running"),
        format!("{} queued", count(JobState::Queued)),
    ];
    let publishing = count(JobState::Publishing);
    if publishing > 0 {
        parts.push(format!("{publishing} publishing"));
    }
    if !view.schedules.is_empty() {
        parts.push(format!("{} schedules", view.schedules.len()));
    }
    parts.join(", ")
}

/// Half of `WATCHDOG_USEC`, when systemd asks this process for keep-alives. As
/// sd_watchdog_enabled(3) says, `WATCHDOG_PID`, when set, must name this process.
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok()? != std::process::id()
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Keeps STATUS current and feeds the watchdog until `stop` is cancelled.
pub fn spawn_keepalive(sched: SchedHandle, stop: CancellationToken) {
    let watchdog = watchdog_interval();
    tokio::spawn(async move {
        let mut changes = sched.subscribe();
        let mut last_status = String::new();
        let mut tick = watchdog.map(tokio::time::interval);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = changes.recv() => {
                    let s = status_line(&sched);
                    if s != last_status {
                        send(&[&format!("STATUS={s}")]);
                        last_status = s;
                    }
                }
                _ = async { match tick.as_mut() { Some(t) => { t.tick().await; } None => std::future::pending().await } } => {
                    let alive = tokio::time::timeout(watchdog.unwrap_or(Duration::from_secs(1)), sched.ping()).await;
                    if matches!(alive, Ok(true)) {
                        send(&["WATCHDOG=1"]);
                    } else {
                        warn!("the scheduler did not answer in time; not feeding the watchdog");
                    }
                }
            }
        }
    });
}
