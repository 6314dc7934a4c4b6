//! `jobctl logs`.

use std::io::Write;
use std::time::{Duration, Instant};

use clap::Args;

use crate::client::{Client, ClientError};
use crate::spec::JobId;
use crate::spec::api::{JobView, LOG_OFFSET_HEADER};

/// How long a following jobctl (`logs -f`, `wait`, `submit --follow`) waits for a daemon that
/// went away to come back (a restart or an upgrade) before it gives up with exit code 3.
pub const RECONNECT_FOR: Duration = Duration::from_secs(120);

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  jobctl logs 12                 the whole standard output\n  \
    jobctl logs -n 50 -f 12        the last 50 lines, then follow until the job ends\n  \
    jobctl logs --stderr 12        the worker's log (train jobs) or the program's stderr\n  \
    jobctl logs --notify 12        what the job's [notify] command printed\n  \
    jobctl --json logs 12          one object {id, stream, offset, text}; with -f, one per chunk"
)]
pub struct LogsArgs {
    /// Job id.
    #[arg(value_parser = super::parse_id)]
    pub id: JobId,
    /// Keep printing new output until the job ends.
    #[arg(short, long)]
    pub follow: bool,
    /// Show standard error instead of standard output.
    #[arg(long)]
    pub stderr: bool,
    /// Show what the job's `[notify]` command printed (`notify.log`) instead.
    #[arg(long, conflicts_with = "stderr")]
    pub notify: bool,
    /// Start with the last N lines.
    #[arg(short = 'n', long, value_name = "N", conflicts_with = "tail")]
    pub lines: Option<usize>,
    /// Start this many bytes before the end.
    #[arg(long, value_name = "BYTES")]
    pub tail: Option<u64>,
}

/// Where the bytes of a log go: called with each chunk and the file offset of its first byte.
type Sink<'a> = dyn FnMut(u64, &[u8]) -> anyhow::Result<()> + Send + 'a;

pub async fn logs(client: &Client, args: &LogsArgs, out: &super::Output) -> anyhow::Result<bool> {
    let stream = match (args.stderr, args.notify) {
        (true, _) => "stderr",
        (_, true) => "notify",
        _ => "stdout",
    };
    let id = args.id;
    // A sweep notifies once, from its last job to end: say so on another job's (empty) log.
    if args.notify
        && let Ok(v) = client.get::<JobView>(&format!("/jobs/{id}")).await
        && let (Some(s), Some(n)) = (&v.record.sweep, &v.record.spec.notify)
        && n.sweep == crate::spec::notify::SweepNotify::Once
    {
        eprintln!(
            "jobctl: job {id} is one of sweep {}, which is notified once: the notification \
             runs in the directory of its last job to end (see `jobctl sweep {}`)",
            s.id, s.id
        );
    }
    // An empty answer for a job that has not run yet would look like a job that printed
    // nothing: say so (on stderr; the log itself stays the output). The daemon refuses
    // `--notify` for a job without `[notify]`.
    if !args.follow
        && !args.notify
        && let Ok(v) = client.get::<JobView>(&format!("/jobs/{id}")).await
        && v.record.attempts == 0
    {
        eprintln!(
            "jobctl: job {id} has not started yet ({}); `jobctl logs -f {id}` waits for its \
             output",
            v.record.state
        );
    }
    // `-n`: the last lines first, then (following) everything after them.
    let (start, head) = match args.lines {
        Some(n) => {
            let (start, text) = last_lines(client, id, stream, n).await?;
            (Some(start + text.len() as u64), Some((start, text)))
        }
        None => (None, None),
    };
    if out.json && !args.follow {
        // One object: the text requested, and where in the file it starts.
        let (mut first, mut text) = head.unwrap_or((0, Vec::new()));
        if start.is_none() {
            let mut got: Option<u64> = None;
            let mut sink = |offset: u64, chunk: &[u8]| {
                got.get_or_insert(offset);
                // One JSON object holds the whole text: bounded, not a 500 MB log in memory.
                if text.len() + chunk.len() > MAX_JSON_LOG_BYTES {
                    anyhow::bail!(
                        "the log of job {id} is larger than {} MiB, too much for one JSON \
                         object: use -n LINES or --tail BYTES, or -f for JSON lines",
                        MAX_JSON_LOG_BYTES >> 20
                    );
                }
                text.extend_from_slice(chunk);
                Ok(())
            };
            copy(client, id, stream, false, args.tail, None, &mut sink).await?;
            first = got.unwrap_or(0);
        }
        out.print_json(&serde_json::json!({
            "id": id,
            "stream": stream,
            "offset": first,
            "text": String::from_utf8_lossy(&text),
        }))?;
        return Ok(true);
    }
    if out.json {
        // JSON lines, one per chunk, each chunk whole UTF-8 (a character split between two
        // chunks goes with the second).
        let mut lines = JsonLines::new(id, stream);
        if let Some((offset, text)) = head {
            lines.emit(offset, &text)?;
        }
        let mut sink = |offset: u64, chunk: &[u8]| lines.emit(offset, chunk);
        copy(client, id, stream, true, args.tail, start, &mut sink).await?;
        lines.finish()?;
        return Ok(true);
    }
    // The requested stream is the result: it goes to stdout either way.
    if let Some((_, text)) = &head {
        write_stdout(text)?;
    }
    let mut printed = head.as_ref().map_or(0, |(_, t)| t.len());
    if args.follow || head.is_none() {
        let mut sink = |_: u64, chunk: &[u8]| {
            printed += chunk.len();
            write_stdout(chunk)
        };
        copy(client, id, stream, args.follow, args.tail, start, &mut sink).await?;
    }
    // Python's tracebacks, tqdm's bars and most tools' errors go to stderr: an empty stdout
    // says nothing about them, so point there.
    if printed == 0 && !args.stderr && !args.notify && !args.follow {
        let mut stderr_bytes = 0;
        let mut count = |_: u64, chunk: &[u8]| {
            stderr_bytes += chunk.len();
            Ok(())
        };
        if copy(client, id, "stderr", false, Some(1), None, &mut count)
            .await
            .is_ok()
            && stderr_bytes > 0
        {
            eprintln!(
                "jobctl: job {id} wrote nothing to stdout, but has output on stderr: \
                 jobctl logs --stderr {id}"
            );
        }
    }
    Ok(true)
}

/// The most `--json logs` (one object) holds.
const MAX_JSON_LOG_BYTES: usize = 64 << 20;

fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()?;
    Ok(())
}

/// The last `n` lines of a job's log (a partial last line counts as one), and the file
/// offset where they start. Reads backwards from the end in growing windows.
pub(super) async fn last_lines(
    client: &Client,
    id: JobId,
    stream: &str,
    n: usize,
) -> anyhow::Result<(u64, Vec<u8>)> {
    const MAX_WINDOW: u64 = 64 << 20;
    let mut window: u64 = (n as u64 * 256).clamp(4096, MAX_WINDOW);
    loop {
        let mut text = Vec::new();
        let mut start: Option<u64> = None;
        let mut sink = |offset: u64, chunk: &[u8]| {
            start.get_or_insert(offset);
            text.extend_from_slice(chunk);
            Ok(())
        };
        copy(client, id, stream, false, Some(window), None, &mut sink).await?;
        let start = start.unwrap_or(0);
        // Line starts: after each '\n' that is not the last byte.
        let body = text.strip_suffix(b"\n").unwrap_or(&text);
        let breaks: Vec<usize> = body
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .map(|(i, _)| i + 1)
            .collect();
        let whole_file = start == 0;
        if breaks.len() >= n {
            let cut = if n == 0 {
                text.len()
            } else {
                breaks[breaks.len() - n]
            };
            return Ok((start + cut as u64, text[cut..].to_vec()));
        }
        if whole_file || window >= MAX_WINDOW {
            // Fewer lines than asked: all of them (from the first whole line when the
            // window did not reach the start of the file).
            let cut = if whole_file {
                0
            } else {
                breaks.first().copied().unwrap_or(0)
            };
            return Ok((start + cut as u64, text[cut..].to_vec()));
        }
        window = (window * 4).min(MAX_WINDOW);
    }
}

/// A followed log as JSON lines: `{"id", "stream", "offset", "text"}` per chunk.
struct JsonLines<'a> {
    id: JobId,
    stream: &'a str,
    /// Bytes of a character that the last chunk ended in the middle of.
    carry: Vec<u8>,
    carry_offset: u64,
}

impl<'a> JsonLines<'a> {
    fn new(id: JobId, stream: &'a str) -> Self {
        JsonLines {
            id,
            stream,
            carry: Vec::new(),
            carry_offset: 0,
        }
    }

    fn emit(&mut self, offset: u64, chunk: &[u8]) -> anyhow::Result<()> {
        match self.take(offset, chunk) {
            Some(line) => write_stdout(format!("{line}\n").as_bytes()),
            None => Ok(()),
        }
    }

    /// The object for `chunk` (at file `offset`), less an incomplete character at its end,
    /// which waits for the next chunk; `None` if nothing is complete yet.
    fn take(&mut self, offset: u64, chunk: &[u8]) -> Option<serde_json::Value> {
        let (offset, mut bytes) = if self.carry.is_empty() {
            (offset, chunk.to_vec())
        } else {
            let mut b = std::mem::take(&mut self.carry);
            b.extend_from_slice(chunk);
            (self.carry_offset, b)
        };
        if let Err(e) = std::str::from_utf8(&bytes)
            && e.error_len().is_none()
        {
            self.carry = bytes.split_off(e.valid_up_to());
            self.carry_offset = offset + bytes.len() as u64;
        }
        (!bytes.is_empty()).then(|| self.object(offset, &bytes))
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        let rest = std::mem::take(&mut self.carry);
        if rest.is_empty() {
            return Ok(());
        }
        let line = self.object(self.carry_offset, &rest);
        write_stdout(format!("{line}\n").as_bytes())
    }

    fn object(&self, offset: u64, bytes: &[u8]) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "stream": self.stream,
            "offset": offset,
            "text": String::from_utf8_lossy(bytes),
        })
    }
}

/// Copies a job's log into `sink`. Following, it survives a daemon restart: when the
/// connection breaks, or the stream ends while the job has not, it waits for jobd to come
/// back and goes on from the byte where it stopped (nothing twice, nothing lost). `start`
/// begins at that byte of the file instead of the end less `tail` (or the start).
async fn copy(
    client: &Client,
    id: JobId,
    stream: &str,
    follow: bool,
    tail: Option<u64>,
    start: Option<u64>,
    sink: &mut Sink<'_>,
) -> anyhow::Result<()> {
    // Where the next byte comes from in the file, once the daemon has said where it started.
    let mut offset: Option<u64> = start;
    // Breaks in a row that brought no byte while jobd kept answering: a stream that cannot
    // be read, not a restart. Give up after a few.
    let mut fruitless = 0;
    loop {
        let before = offset;
        let mut path = format!("/jobs/{id}/logs?stream={stream}&follow={follow}");
        match (offset, tail) {
            (Some(o), _) => path.push_str(&format!("&offset={o}")),
            (None, Some(t)) => path.push_str(&format!("&tail={t}")),
            (None, None) => {}
        }
        let copied = async {
            let mut body = client.stream(&path).await?;
            if offset.is_none() {
                let start = body.header(LOG_OFFSET_HEADER).and_then(|v| v.parse().ok());
                offset = Some(start.unwrap_or(0));
            }
            while let Some(chunk) = body.next_chunk().await? {
                sink(offset.unwrap_or(0), &chunk)?;
                if let Some(o) = offset.as_mut() {
                    *o += chunk.len() as u64;
                }
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        if !follow {
            return copied;
        }
        match copied {
            // The stream ends when the job does, or when jobd stops.
            Ok(()) => match client.get::<JobView>(&format!("/jobs/{id}")).await {
                Ok(j) if j.record.state.is_terminal() => return Ok(()),
                Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(e) if e.is_transient() => reconnect(client, &e).await?,
                Err(e) => return Err(e.into()),
            },
            Err(e) => match e.downcast_ref::<ClientError>() {
                Some(c) if c.is_transient() => {
                    fruitless = if offset == before { fruitless + 1 } else { 0 };
                    if fruitless > 3 {
                        return Err(e);
                    }
                    reconnect(client, c).await?
                }
                _ => return Err(e),
            },
        }
    }
}

/// Waits (up to [`RECONNECT_FOR`]) for jobd to answer again after it went away mid-follow;
/// the last error if it does not come back. A daemon back within a few seconds (a restart in
/// place, `systemctl reload`) goes unremarked; a longer absence is said on stderr, once for
/// all the streams followed.
pub async fn reconnect(client: &Client, why: &ClientError) -> Result<(), ClientError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    // Said by one follower for all (stdout and stderr are followed side by side).
    static SAID_LOST: AtomicBool = AtomicBool::new(false);
    const QUIET_FOR: Duration = Duration::from_secs(3);
    let started = Instant::now();
    let deadline = started + RECONNECT_FOR;
    let mut said = false;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match client.get::<serde_json::Value>("/health").await {
            Ok(_) => {
                if SAID_LOST.swap(false, Ordering::SeqCst) {
                    eprintln!("jobctl: jobd is back; following again");
                }
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline || !e.is_transient() => return Err(e),
            Err(_) => {}
        }
        if !said && started.elapsed() >= QUIET_FOR {
            said = true;
            if !SAID_LOST.swap(true, Ordering::SeqCst) {
                let how = match why {
                    ClientError::Interrupted(_) => "the connection closed".to_string(),
                    other => other.to_string(),
                };
                eprintln!(
                    "jobctl: lost jobd ({how}); waiting up to {}s for it to come back",
                    RECONNECT_FOR.as_secs()
                );
            }
        }
    }
}

/// Follows a job's stdout (to our stdout, or stderr with `all_to_stderr`) and stderr (to our
/// stderr) until it ends.
pub async fn follow_both(client: &Client, id: JobId, all_to_stderr: bool) -> anyhow::Result<()> {
    let mut to_out = |_: u64, chunk: &[u8]| {
        if all_to_stderr {
            std::io::stderr().write_all(chunk)?;
            Ok(())
        } else {
            write_stdout(chunk)
        }
    };
    let mut to_err = |_: u64, chunk: &[u8]| Ok(std::io::stderr().write_all(chunk)?);
    let out = copy(client, id, "stdout", true, None, None, &mut to_out);
    let err = copy(client, id, "stderr", true, None, None, &mut to_err);
    // The first failure ends both (stdout's reader gone: no waiting for the job to end).
    tokio::try_join!(out, err).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_chunks_carry_a_split_character_to_the_next() {
        let mut j = JsonLines::new(7, "stdout");
        let text = "a✓b".as_bytes(); // ✓ is 3 bytes: 1..4
        let first = j.take(100, &text[..2]).unwrap();
        assert_eq!(
            (first["offset"].as_u64(), first["text"].as_str()),
            (Some(100), Some("a"))
        );
        assert!(j.take(102, &text[2..3]).is_none(), "still incomplete");
        let second = j.take(103, &text[3..]).unwrap();
        assert_eq!(
            (second["offset"].as_u64(), second["text"].as_str()),
            (Some(101), Some("✓b"))
        );
        // Invalid bytes (not a split character) are replaced, not held back.
        let bad = j.take(105, b"x\xffy").unwrap();
        assert_eq!(bad["text"], "x\u{fffd}y");
    }
}
