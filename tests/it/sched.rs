//! Placement and policy on fake GPU inventories, through the real daemon.

use std::time::{Duration, Instant};

use jobd::spec::JobState;

use crate::daemon::*;

fn explain(d: &TestDaemon, id: u64) -> String {
    let out = d.jobctl(&["explain", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

fn gpu_job(d: &TestDaemon, name: &str, vram: &str, priority: i32, script: &str) -> u64 {
    let f = d.write(
        &format!("{name}.toml"),
        &command_job(
            script,
            &format!(
                "name = \"{name}\"\npriority = {priority}\n[resources]\ngpus = 1\nvram = \"{vram}\""
            ),
        ),
    );
    d.submit(&f)
}

/// Two 10 GiB jobs share one 24 GiB GPU; a third waits, and explain says why with numbers.
#[test]
fn small_jobs_share_a_gpu_and_the_rest_wait_with_a_reason() {
    let d = TestDaemon::start(&["--gpus", "fake:24GiB"]);
    let a = gpu_job(&d, "a", "10GiB", 0, "sleep 30");
    let b = gpu_job(&d, "b", "10GiB", 0, "sleep 30");
    let c = gpu_job(&d, "c", "10GiB", 0, "sleep 30");
    d.wait_state(a, JobState::Running, Duration::from_secs(10));
    d.wait_state(b, JobState::Running, Duration::from_secs(10));
    assert_eq!(d.state(c), JobState::Queued);
    let x = explain(&d, c);
    assert!(
        x.contains("needs 10GiB on one GPU") && x.contains("GPU 0 with 3.8GiB free"),
        "{x}"
    );
    let list = stdout(&d.jobctl(&["list"]));
    assert!(
        list.contains("vram: 10GiB"),
        "list shows the short reason:\n{list}"
    );
    let gpus = stdout(&d.jobctl(&["gpus"]));
    assert!(
        gpus.contains("20GiB") && gpus.contains("1:root") || gpus.contains(&format!("{a}:")),
        "{gpus}"
    );
    // When one finishes, the waiting job starts at once (event-driven).
    assert!(d.jobctl(&["cancel", &a.to_string()]).status.success());
    d.wait_state(c, JobState::Running, Duration::from_secs(10));
}

/// A 30 GiB job waits for the 80 GiB card (never the 24 GiB one); an impossible one is refused.
#[test]
fn a_large_job_waits_for_the_big_card() {
    let d = TestDaemon::start(&["--gpus", "fake:24GiB,80GiB"]);
    let big = gpu_job(&d, "big", "60GiB", 0, "sleep 30");
    d.wait_state(big, JobState::Running, Duration::from_secs(10));
    assert_eq!(d.job(big).record.placement.unwrap().gpus[0].index, 1);
    let mid = gpu_job(&d, "mid", "30GiB", 0, "echo ran on $CUDA_VISIBLE_DEVICES");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        d.state(mid),
        JobState::Queued,
        "30 GiB does not fit the 24 GiB card"
    );
    assert!(
        explain(&d, mid).contains("needs 30GiB"),
        "{}",
        explain(&d, mid)
    );
    assert!(d.jobctl(&["cancel", &big.to_string()]).status.success());
    let out = d.jobctl(&["wait", &mid.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&d.jobctl(&["logs", &mid.to_string()])), "ran on 1\n");
    let f = d.write(
        "huge.toml",
        &command_job("true", "[resources]\ngpus = 1\nvram = \"100GiB\""),
    );
    let out = d.jobctl(&["submit", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("largest eligible GPU has 80GiB"),
        "{}",
        stderr(&out)
    );
}

/// A high-priority job preempts a low one within seconds; the low one checkpoints (exit 75),
/// is requeued at once and completes later.
#[test]
fn preemption_requeues_and_resumes_the_low_priority_job() {
    let d = TestDaemon::start(&["--gpus", "fake:24GiB"]);
    let state_file = d.path("low.state");
    let low = gpu_job(
        &d,
        "low",
        "20GiB",
        0,
        &format!(
            "n=$(cat {0} 2>/dev/null || echo 0); echo attempt $JOBD_ATTEMPT resumes at $n; \
             trap 'echo $n > {0}; echo checkpointed; exit 75' TERM; \
             while [ $n -lt 6 ]; do n=$((n+1)); echo $n > {0}; sleep 0.2; done; echo done",
            state_file.display()
        ),
    );
    d.wait_state(low, JobState::Running, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let high = gpu_job(&d, "high", "20GiB", 10, "echo high ran; sleep 0.5");
    d.wait_state(high, JobState::Running, Duration::from_secs(10));
    let preempt_to_running = t.elapsed();
    assert!(
        preempt_to_running < Duration::from_secs(3),
        "preemption took {preempt_to_running:?}"
    );
    let out = d.jobctl(&["wait", &high.to_string(), &low.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stdout(&d.jobctl(&["logs", &low.to_string()]));
    assert!(log.contains("checkpointed"), "{log}");
    assert!(log.contains("attempt 2 resumes at"), "{log}");
    assert!(log.trim_end().ends_with("done"), "{log}");
    let events = d.events(low);
    assert!(
        events.iter().any(|e| e.state == JobState::Interrupted
            && e.reason.contains(&format!("preempted for job {high}"))),
        "{events:?}"
    );
}

/// depends_on waits for success and fails the dependent when the dependency fails; retries by
/// exit code with backoff, then fail.
#[test]
fn dependencies_and_retries() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let first = d.submit(&d.write("first.toml", &command_job("sleep 0.5; exit 0", "")));
    let after = d.submit(&d.write(
        "after.toml",
        &command_job("echo after", &format!("depends_on = [{first}]")),
    ));
    assert!(
        explain(&d, after).contains(&format!("waits for job {first} to succeed")),
        "{}",
        explain(&d, after)
    );
    let out = d.jobctl(&["wait", &after.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bad = d.submit(&d.write("bad.toml", &command_job("sleep 1; exit 4", "")));
    let dep = d.submit(&d.write(
        "dep.toml",
        &command_job("echo never", &format!("depends_on = [{bad}]")),
    ));
    d.wait_state(dep, JobState::Failed, Duration::from_secs(10));
    assert!(
        d.job(dep)
            .record
            .reason
            .unwrap()
            .contains(&format!("dependency job {bad} failed"))
    );
    // Once the dependency has failed, a new dependent is refused: it would fail at once.
    let late = d.write(
        "late.toml",
        &command_job("echo never", &format!("depends_on = [{bad}]")),
    );
    let out = d.jobctl(&["submit", late.to_str().unwrap()]);
    assert!(
        out.status.code() == Some(1)
            && stderr(&out).contains(&format!(
                "job {bad} has failed, so this job would fail at once"
            )),
        "{}",
        stderr(&out)
    );
    // A chain fails all the way down at once (the third link used to wait for some unrelated
    // event to wake the scheduler), and `wait` on its end returns.
    let gate = d.submit(&d.write("gate.toml", &command_job("sleep 2; exit 1", "")));
    let mut chain = vec![gate];
    for i in 0..3 {
        let prev = *chain.last().unwrap();
        chain.push(d.submit(&d.write(
            &format!("link{i}.toml"),
            &command_job("echo never", &format!("depends_on = [{prev}]")),
        )));
    }
    wait_for("the whole chain to fail", Duration::from_secs(10), || {
        chain[1..].iter().all(|id| d.state(*id) == JobState::Failed)
    });
    let out = d.jobctl(&["wait", &chain[3].to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    let flaky = d.submit(&d.write(
        "flaky.toml",
        &command_job(
            "echo try $JOBD_ATTEMPT; exit 3",
            "[retry]\nmax = 2\non_exit_codes = [3]\nbackoff = \"1s\"",
        ),
    ));
    wait_for("a retry backoff", Duration::from_secs(10), || {
        explain(&d, flaky).contains("before its next retry")
    });
    d.wait_state(flaky, JobState::Failed, Duration::from_secs(20));
    let v = d.job(flaky).record;
    assert_eq!((v.attempts, v.retries), (3, 2));
    assert_eq!(
        stdout(&d.jobctl(&["logs", &flaky.to_string()])),
        "try 1\ntry 2\ntry 3\n"
    );
    let other = d.submit(&d.write(
        "other.toml",
        &command_job("exit 5", "[retry]\nmax = 2\non_exit_codes = [3]"),
    ));
    d.wait_state(other, JobState::Failed, Duration::from_secs(10));
    assert_eq!(d.job(other).record.attempts, 1, "exit 5 is not retried");
}

/// Waiting reasons for user limits and CPU slots, in explain and list.
#[test]
fn explain_names_limits_and_slots() {
    let d = TestDaemon::start_with_config(
        &["--gpus", "fake:80GiB", "--max-cpu-jobs", "1"],
        "[scheduler.limits.default]\nmax_running = 1\n",
    );
    let a = gpu_job(&d, "a", "10GiB", 0, "sleep 30");
    let b = gpu_job(&d, "b", "10GiB", 0, "sleep 30");
    d.wait_state(a, JobState::Running, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        explain(&d, b).contains("its owner is at a limit: 1 of 1 running jobs"),
        "{}",
        explain(&d, b)
    );
    assert!(
        d.jobctl(&["cancel", &a.to_string(), &b.to_string()])
            .status
            .success()
    );
    let c = d.submit(&d.write("c.toml", &command_job("sleep 30", "")));
    d.wait_state(c, JobState::Running, Duration::from_secs(10));
    let d2 = TestDaemon::start(&["--gpus", "none", "--max-cpu-jobs", "1"]);
    let x = d2.submit(&d2.write("x.toml", &command_job("sleep 30", "")));
    let y = d2.submit(&d2.write("y.toml", &command_job("sleep 30", "")));
    d2.wait_state(x, JobState::Running, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        explain(&d2, y).contains("waits for a CPU job slot (all 1 are in use)"),
        "{}",
        explain(&d2, y)
    );
}

/// `max_submitted` through the real daemon and jobctl: a submit (or a schedule's run) past it
/// fails with the limit and where it is set, and a cancel makes room again.
#[test]
fn submits_past_max_submitted_are_refused_until_one_is_cancelled() {
    let d = TestDaemon::start_with_config(
        &["--gpus", "none", "--max-cpu-jobs", "1"],
        "[scheduler.limits.default]\nmax_submitted = 2\n",
    );
    let file = d.write("s.toml", &command_job("sleep 30", ""));
    let a = d.submit(&file);
    let b = d.submit(&file);
    d.wait_state(a, JobState::Running, Duration::from_secs(10));
    assert_eq!(d.state(b), JobState::Queued);
    let refused = d.jobctl(&["submit", file.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    let err = stderr(&refused);
    assert!(
        err.contains(
            "has 2 unfinished jobs; [scheduler.limits.default] max_submitted allows 2: \
                      wait for some to finish or cancel some"
        ),
        "{err}"
    );
    assert_eq!(d.all_jobs().len(), 2, "the refused submit queued nothing");
    // `whoami` tells a user their limits and where they stand, before a refusal does.
    let who = stdout(&d.jobctl(&["whoami"]));
    assert!(
        who.contains(
            "unfinished jobs: 2 of at most 2 (max_submitted in [scheduler.limits.default])"
        ) && who.contains("running: 1 (no limit on jobs, GPUs or VRAM)"),
        "{who}"
    );
    let who: serde_json::Value =
        serde_json::from_str(&stdout(&d.jobctl(&["whoami", "--json"]))).unwrap();
    assert_eq!(who["limits"]["unfinished"], 2, "{who}");
    assert_eq!(who["limits"]["max_submitted"], 2, "{who}");
    // A schedule's run is refused the same way, and `jobctl schedules` says why it queued
    // nothing.
    let yearly = d.write(
        "yearly.toml",
        &command_job("true", "schedule = \"0 0 1 1 *\""),
    );
    let sid = schedule_id(&d.jobctl(&["submit", yearly.to_str().unwrap()]));
    let run = d.jobctl(&["schedule", "run-now", &sid.to_string()]);
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("max_submitted allows 2"),
        "{}",
        stderr(&run)
    );
    let listed = stdout(&d.jobctl(&["schedules"]));
    assert!(
        listed.contains(&format!("schedule {sid}: run now by "))
            && listed.contains("skipped, ")
            && listed.contains("has 2 unfinished jobs"),
        "{listed}"
    );
    assert_eq!(d.all_jobs().len(), 2, "the refused run queued nothing");
    assert!(d.jobctl(&["cancel", &b.to_string()]).status.success());
    let c = d.submit(&file);
    assert_eq!(d.state(c), JobState::Queued);
}

/// Memory used by processes jobd does not own (simulated with a fake inventory file that the
/// daemon re-reads) is respected, and explain shows it; a job that needs more GPUs than exist
/// is refused at submit; a preempting job explains what it waits for.
#[test]
fn foreign_memory_is_respected_and_preemption_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("gpus.toml");
    std::fs::write(&fake, "[[gpu]]\ntotal = \"24GiB\"\nforeign = \"0GiB\"\n").unwrap();
    let spec = format!("fake-file:{}", fake.display());
    let d = TestDaemon::start(&["--gpus", &spec, "--grace-period", "5s"]);
    // Someone else's process now takes 16 GiB of the card.
    std::fs::write(&fake, "[[gpu]]\ntotal = \"24GiB\"\nforeign = \"16GiB\"\n").unwrap();
    // It checkpoints for a second when told to stop (so the preemption below can be seen).
    let a = gpu_job(
        &d,
        "a",
        "10GiB",
        0,
        "trap 'sleep 1; exit 75' TERM; sleep 30 & wait",
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        d.state(a),
        JobState::Queued,
        "10 GiB does not fit next to 16 GiB of foreign use"
    );
    let x = explain(&d, a);
    assert!(
        x.contains("needs 10GiB")
            && x.contains("GPU 0's 7.8GiB")
            && x.contains("other programs free memory"),
        "{x}"
    );
    let gpus = stdout(&d.jobctl(&["gpus"]));
    assert!(gpus.contains("16GiB"), "foreign use is shown:\n{gpus}");
    // The foreign process goes away: the job starts (at the next inventory refresh, which
    // happens before each placement; a submit triggers one).
    std::fs::write(&fake, "[[gpu]]\ntotal = \"24GiB\"\nforeign = \"0GiB\"\n").unwrap();
    let b = gpu_job(&d, "b", "1GiB", 0, "sleep 30");
    d.wait_state(a, JobState::Running, Duration::from_secs(15));
    d.wait_state(b, JobState::Running, Duration::from_secs(15));

    // A high-priority job that needs the whole card preempts both; explain says so meanwhile.
    let hi = gpu_job(&d, "hi", "20GiB", 5, "echo hi");
    let explained = wait_for_text(&d, hi, "being stopped");
    assert!(explained.contains("lower-priority jobs"), "{explained}");
    let out = d.jobctl(&["wait", &hi.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));

    let f = d.write(
        "two.toml",
        &command_job("true", "[resources]\ngpus = 2\nvram = \"1GiB\""),
    );
    let out = d.jobctl(&["submit", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("needs 2 GPUs but only 1"),
        "{}",
        stderr(&out)
    );
    assert!(
        d.jobctl(&["cancel", &a.to_string(), &b.to_string()])
            .status
            .success()
    );
}

/// Polls `jobctl explain` until its text contains `want` (the state changes quickly).
fn wait_for_text(d: &TestDaemon, id: u64, want: &str) -> String {
    let mut last = String::new();
    wait_for(
        &format!("explain {id} to mention {want:?}"),
        Duration::from_secs(10),
        || {
            last = explain(d, id);
            last.contains(want)
        },
    );
    last
}

/// Exit code 75 means "I checkpointed after SIGTERM, run me again". A job that returns it
/// when jobd never asked it to stop is requeued a bounded number of times, after the first
/// with the retry backoff, then fails saying why; it used to be requeued at once, forever
/// (~230 attempts a second in a QA run). A requeue by hand starts the count again.
#[test]
fn an_unrequested_exit_75_is_requeued_a_few_times_then_fails() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let f = d.write(
        "tempfail.toml",
        &command_job(
            "echo attempt $JOBD_ATTEMPT; exit 75",
            "[retry]\nbackoff = \"1s\"",
        ),
    );
    let id = d.submit(&f);
    d.wait_state(id, JobState::Failed, Duration::from_secs(30));
    let rec = d.job(id).record;
    assert_eq!(rec.attempts, 4, "1 run + 3 requeues");
    let reason = rec.reason.unwrap_or_default();
    assert!(
        reason.contains("exit code 75") && reason.contains("4 times"),
        "{reason}"
    );
    let history: Vec<String> = d.events(id).into_iter().map(|e| e.reason).collect();
    assert!(
        history.iter().any(|m| m.contains("requeued in 1s (2 of 3")),
        "the second requeue waits for the backoff: {history:#?}"
    );
    assert!(d.job(id).record.unrequested_requeues == 3);
    // A finished job keeps its reason: no priority changes after the end.
    let out = d.jobctl(&["priority", &id.to_string(), "5"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("has already failed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(d.job(id).record.reason.unwrap_or_default(), reason);
    // An unknown id first: reported, and the job after it is still requeued (as cancel does).
    let out = d.jobctl(&["requeue", "999", &id.to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim(), "jobctl: job 999 not found");
    assert_eq!(stdout(&out).trim(), format!("job {id}: queued"));
    d.wait_state(id, JobState::Failed, Duration::from_secs(30));
    assert_eq!(
        d.job(id).record.attempts,
        8,
        "the count starts again after a requeue"
    );
}

/// `explain` counts a retry backoff down as time passes (it used to show the seconds left
/// when the scheduler last changed anything, frozen until some other event).
#[test]
fn explain_counts_a_backoff_down() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let id = d.submit(&d.write(
        "later.toml",
        &command_job("exit 3", "[retry]\nmax = 1\nbackoff = \"30s\""),
    ));
    let secs_left = || {
        let x = explain(&d, id);
        x.split("waits ")
            .nth(1)
            .and_then(|r| r.split('s').next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    wait_for("the backoff", Duration::from_secs(10), || {
        secs_left().is_some()
    });
    let first = secs_left().unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let later = secs_left().unwrap();
    assert!(later + 2 <= first, "{first}s, then {later}s");
    assert!(d.jobctl(&["cancel", &id.to_string()]).status.success());
}

/// `on_exit_codes = [137]`, the README's example, retries a job killed by SIGKILL (as the
/// OOM killer does): a signal N counts as exit code 128 + N. A command run without a shell
/// reports the signal itself, so before this such a job was never retried.
#[test]
fn a_retry_on_137_covers_a_sigkill() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let id = d.submit(&d.write(
        "oom.toml",
        &command_job(
            "kill -KILL $$",
            "[retry]\nmax = 1\non_exit_codes = [137]\nbackoff = \"1s\"",
        ),
    ));
    d.wait_state(id, JobState::Failed, Duration::from_secs(20));
    let rec = d.job(id).record;
    assert_eq!((rec.attempts, rec.retries), (2, 1), "{:#?}", d.events(id));
}

/// `jobctl requeue DEPENDENT DEPENDENCY` works in either order: the dependency goes back
/// first (it used to requeue the dependent first, which failed again at once on the still
/// failed dependency while jobctl said "queued").
#[test]
fn requeue_puts_dependencies_back_first() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let marker = d.path("fixed");
    let a = d.submit(&d.write(
        "a.toml",
        &command_job(&format!("sleep 1; test -e {}", marker.display()), ""),
    ));
    let b = d.submit(&d.write(
        "b.toml",
        &command_job("echo b", &format!("depends_on = [{a}]")),
    ));
    d.wait_state(b, JobState::Failed, Duration::from_secs(20));
    std::fs::write(&marker, "").unwrap();
    let out = d.jobctl(&["requeue", &b.to_string(), &a.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.wait_state(b, JobState::Succeeded, Duration::from_secs(20));
    assert_eq!(d.state(a), JobState::Succeeded);
}

/// The inventory is refreshed every `gpu_refresh` even with no GPU work, so `jobctl gpus`
/// shows other processes' memory to people deciding where to run (it used to stay stale until
/// a GPU job was submitted).
#[test]
fn an_idle_daemon_keeps_the_gpu_view_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("gpus.toml");
    std::fs::write(&fake, "[[gpu]]\ntotal = \"24GiB\"\nforeign = \"0GiB\"\n").unwrap();
    let spec = format!("fake-file:{}", fake.display());
    let d =
        TestDaemon::start_with_config(&["--gpus", &spec], "[scheduler]\ngpu_refresh = \"1s\"\n");
    std::fs::write(&fake, "[[gpu]]\ntotal = \"24GiB\"\nforeign = \"7GiB\"\n").unwrap();
    wait_for("the new foreign use", Duration::from_secs(10), || {
        stdout(&d.jobctl(&["gpus"])).contains("7GiB")
    });
}

/// `allowed_gpus` keeps jobs off the other cards, and an entry naming a GPU the machine does
/// not have is logged once (it used to be ignored without a word).
#[test]
fn allowed_gpus_confine_jobs_and_a_missing_one_is_warned_about() {
    let d = TestDaemon::start_with_config(
        &["--gpus", "fake:24GiB,24GiB"],
        "[scheduler]\nallowed_gpus = [1, 7]\ngpu_refresh = \"1s\"\n",
    );
    let a = gpu_job(&d, "a", "4GiB", 0, "sleep 30");
    let b = gpu_job(&d, "b", "4GiB", 0, "sleep 30");
    d.wait_state(a, JobState::Running, Duration::from_secs(10));
    d.wait_state(b, JobState::Running, Duration::from_secs(10));
    for id in [a, b] {
        assert_eq!(d.job(id).record.placement.unwrap().gpus[0].index, 1);
    }
    // Several refreshes later, still one warning.
    std::thread::sleep(Duration::from_millis(2500));
    let log = d.log();
    let warned = log
        .lines()
        .filter(|l| l.contains("allowed_gpus names GPUs this machine does not have"))
        .collect::<Vec<_>>();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(
        warned[0].contains('7') && !warned[0].contains("1, "),
        "{}",
        warned[0]
    );
}

/// A train job too big for every GPU is refused with the change that makes it fit, when
/// recomputing activations is enough (QA: "needs 156GiB" and nothing more, though the
/// estimate knew that gradient checkpointing halves it).
#[test]
fn a_train_job_too_big_is_told_what_would_make_it_fit() {
    let d = TestDaemon::start(&["--gpus", "fake:24GiB"]);
    // A 7B llama, as far as the estimate looks: its config (the files need only exist).
    let base = d.path("llama-7b");
    std::fs::create_dir(&base).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    });
    std::fs::write(base.join("config.json"), config.to_string()).unwrap();
    for f in ["tokenizer.json", "model.safetensors"] {
        std::fs::write(base.join(f), "{}").unwrap();
    }
    let data = d.write("train.jsonl", "{\"text\": \"hello\"}\n");
    let job = |extra: &str| {
        format!(
            "kind = \"train\"\n[model]\nbase = {:?}\n[data]\ntrain_file = {:?}\nblock_size = 4096\n\
             [training]\ndtype = \"bf16\"\nper_device_train_batch_size = 1\n{extra}\n\
             [lora]\nr = 16\ntarget_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"]\n\
             [resources]\ngpus = 1\n",
            base.display().to_string(),
            data.display().to_string()
        )
    };
    let out = d.jobctl(&["submit", d.write("big.toml", &job("")).to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("with training.gradient_checkpointing = true it needs")
            && stderr(&out).contains("and fits"),
        "{}",
        stderr(&out)
    );
    let out = d.jobctl(&[
        "submit",
        d.write("ckpt.toml", &job("gradient_checkpointing = true"))
            .to_str()
            .unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.jobctl(&["cancel", stdout(&out).trim()]);
}

/// Is `pid` a live process (not gone, not a zombie)?
fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s[s.rfind(')')? + 2..].chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// Processes that leave the job's process group (`setsid`, `start_new_session=True`) end
/// with the job: when its command ends by itself, and at a cancel even when they and the
/// command ignore SIGTERM. They used to run on under init, holding the GPU memory of a job
/// that jobd had already ended.
#[test]
fn processes_that_leave_the_group_end_with_the_job() {
    let d = TestDaemon::start(&["--gpus", "none", "--grace-period", "3s"]);
    let pid_in = |path: &std::path::Path| -> i32 {
        let mut pid = 0;
        wait_for("the escaped pid", Duration::from_secs(20), || {
            pid = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            pid > 0
        });
        pid
    };

    let first = d.path("first.pid");
    let id = d.submit(&d.write(
        "ends.toml",
        &command_job(
            &format!("setsid sleep 300 & echo $! > {}; sleep 1", first.display()),
            "",
        ),
    ));
    let pid = pid_in(&first);
    assert!(process_alive(pid));
    d.wait_state(id, JobState::Succeeded, Duration::from_secs(30));
    wait_for("the escaped process to end", Duration::from_secs(5), || {
        !process_alive(pid)
    });

    let second = d.path("second.pid");
    let id = d.submit(&d.write(
        "cancelled.toml",
        &command_job(
            &format!(
                "setsid sh -c 'trap \"\" TERM; sleep 300' & echo $! > {}; trap '' TERM; sleep 300",
                second.display()
            ),
            "",
        ),
    ));
    let pid = pid_in(&second);
    d.wait_state(id, JobState::Running, Duration::from_secs(10));
    assert!(d.jobctl(&["cancel", &id.to_string()]).status.success());
    d.wait_state(id, JobState::Cancelled, Duration::from_secs(30));
    wait_for("the escaped process to end", Duration::from_secs(5), || {
        !process_alive(pid)
    });

    // The job kills its supervisor (it runs as the job's owner): what escaped still ends.
    let third = d.path("third.pid");
    let id = d.submit(&d.write(
        "killer.toml",
        &command_job(
            &format!(
                "setsid sleep 300 & echo $! > {}; sleep 0.5; kill -9 $PPID; sleep 300",
                third.display()
            ),
            "",
        ),
    ));
    let pid = pid_in(&third);
    d.wait_state(id, JobState::Failed, Duration::from_secs(20));
    wait_for("the escaped process to end", Duration::from_secs(5), || {
        !process_alive(pid)
    });

    // Run as another user, a job cannot kill its supervisor at all (it stays root), so even
    // a process that drops the job's environment ends with the job.
    let job = d.write(
        "stripped.toml",
        &command_job(
            "setsid env -u JOBD_JOB_DIR sleep 300 & echo $! > \"$JOBD_JOB_DIR/esc.pid\"; \
             kill -9 $PPID || echo refused; sleep 1",
            "",
        ),
    );
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["submit", job.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id: u64 = stdout(&out).trim().parse().unwrap();
    let pid = pid_in(&d.state.join(format!("jobs/{id}/esc.pid")));
    d.wait_state(id, JobState::Succeeded, Duration::from_secs(20));
    assert!(stdout(&d.jobctl(&["logs", &id.to_string()])).contains("refused"));
    wait_for("the escaped process to end", Duration::from_secs(5), || {
        !process_alive(pid)
    });
}

/// A job asking for more CPU threads than the machine has cores is refused at submit (it
/// would run with OMP_NUM_THREADS that high), as are arguments longer than Linux takes.
#[test]
fn impossible_cpus_and_arguments_are_refused_at_submit() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let many = d.write(
        "many.toml",
        &command_job("true", "[resources]\ncpus = 4096"),
    );
    let out = d.jobctl(&["submit", many.to_str().unwrap()]);
    assert!(
        out.status.code() == Some(1) && stderr(&out).contains("more than this machine's"),
        "{}",
        stderr(&out)
    );
    let long = d.write(
        "long.toml",
        &format!(
            "kind = \"command\"\n[command]\nargv = [\"echo\", \"{}\"]\n",
            "x".repeat(200_000)
        ),
    );
    let out = d.jobctl(&["submit", long.to_str().unwrap()]);
    assert!(
        out.status.code() == Some(1) && stderr(&out).contains("command.argv[1]: is 200000 bytes"),
        "{}",
        stderr(&out)
    );
}

/// `resources.time_limit` stops a run that takes longer (SIGTERM first: the job may save its
/// state) and fails the job, saying why; a run within its limit is left alone.
#[test]
fn a_run_past_its_time_limit_is_stopped_and_fails() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let slow = d.submit(&d.write(
        "slow.toml",
        &command_job(
            "trap 'echo saving; exit 75' TERM; sleep 30 & wait",
            "[resources]\ntime_limit = \"2s\"",
        ),
    ));
    let quick = d.submit(&d.write(
        "quick.toml",
        &command_job("sleep 0.2", "[resources]\ntime_limit = \"1m\""),
    ));
    d.wait_state(quick, JobState::Succeeded, Duration::from_secs(20));
    let started = Instant::now();
    d.wait_state(slow, JobState::Failed, Duration::from_secs(20));
    assert!(started.elapsed() < Duration::from_secs(10));
    let rec = d.job(slow).record;
    assert!(
        rec.reason
            .as_deref()
            .is_some_and(|r| r.contains("time limit of 2s")),
        "{:?}",
        rec.reason
    );
    let out = stdout(&d.jobctl(&["logs", &slow.to_string()]));
    assert_eq!(out, "saving\n", "SIGTERM came first");
}

/// `resources.stall_timeout`: a run that goes quiet (no output, no progress) for that long is
/// stopped and retried as a failure, then fails saying it stalled; one that keeps printing
/// runs on past the timeout.
#[test]
fn a_stalled_run_is_stopped_and_retried() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let hung = d.submit(&d.write(
        "hung.toml",
        &command_job(
            "echo started; sleep 60",
            "[resources]\nstall_timeout = \"2s\"\n[retry]\nmax = 1\nbackoff = \"0s\"",
        ),
    ));
    let alive = d.submit(&d.write(
        "alive.toml",
        &command_job(
            "for i in 1 2 3 4 5 6 7 8; do echo $i; sleep 0.5; done",
            "[resources]\nstall_timeout = \"2s\"",
        ),
    ));
    d.wait_state(alive, JobState::Succeeded, Duration::from_secs(30));
    d.wait_state(hung, JobState::Failed, Duration::from_secs(30));
    let rec = d.job(hung).record;
    assert_eq!((rec.attempts, rec.retries), (2, 1), "{:#?}", d.events(hung));
    assert!(
        rec.reason
            .as_deref()
            .is_some_and(|r| r.starts_with("stalled: no output or progress for 2s")),
        "{:?}",
        rec.reason
    );
}

/// `hold` keeps a queued job from starting (explain and list say so), `release` lets it go;
/// `submit --hold` queues it held; only queued jobs can be held, and only by their owner or
/// an admin.
#[test]
fn hold_and_release() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let held = d.write("held.toml", &command_job("echo ran", ""));
    let out = d.jobctl(&["submit", "--hold", held.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id: u64 = stdout(&out).trim().parse().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.state(id), JobState::Queued);
    assert!(explain(&d, id).contains("on hold"), "{}", explain(&d, id));
    let list = stdout(&d.jobctl(&["list"]));
    assert!(list.contains("held by root"), "{list}");
    let show = stdout(&d.jobctl(&["show", &id.to_string()]));
    assert!(show.contains("held: by root"), "{show}");
    let only_held = stdout(&d.jobctl(&["list", "--state", "held"]));
    assert_eq!(only_held.lines().count(), 2, "{only_held}");
    let after = d.submit(&d.write(
        "after.toml",
        &command_job("true", &format!("depends_on = [{id}]")),
    ));
    assert!(
        explain(&d, after).contains(&format!("Job {id} is on hold")),
        "{}",
        explain(&d, after)
    );
    // Someone else may not release it.
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["release", &id.to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let out = d.jobctl(&["release", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.wait_state(id, JobState::Succeeded, Duration::from_secs(20));
    // A job that ended cannot be held; `hold` of a queued one holds it.
    let out = d.jobctl(&["hold", &id.to_string()]);
    assert!(
        out.status.code() == Some(1) && stderr(&out).contains("only queued jobs can be held"),
        "{}",
        stderr(&out)
    );
    let blocker = d.submit(&d.write("dep.toml", &command_job("sleep 30", "")));
    let later = d.submit(&d.write(
        "later.toml",
        &command_job("echo later", &format!("depends_on = [{blocker}]")),
    ));
    let out = d.jobctl(&["hold", &later.to_string()]);
    assert!(stdout(&out).contains("held by root"), "{}", stdout(&out));
    assert!(
        d.jobctl(&["cancel", &blocker.to_string(), &later.to_string()])
            .status
            .success()
    );
    // A cancelled job is not held any more, nor can it be.
    let out = d.jobctl(&["hold", &later.to_string()]);
    assert!(
        out.status.code() == Some(1) && stderr(&out).contains("was cancelled; only queued"),
        "{}",
        stderr(&out)
    );

    // An admin's hold on someone else's job is an admin's to release.
    let long = d.submit(&d.write("long.toml", &command_job("sleep 30", "")));
    let waits = d.write(
        "waits.toml",
        &command_job("true", &format!("depends_on = [{long}]")),
    );
    let theirs = d.jobctl_tcp(
        Some(TOKEN_NOBODY),
        &["submit", waits.to_str().unwrap(), "--hold"],
    );
    let theirs = stdout(&theirs).trim().to_string();
    assert!(d.jobctl(&["release", &theirs]).status.success());
    assert!(d.jobctl(&["hold", &theirs]).status.success());
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["release", &theirs]);
    assert!(
        out.status.code() == Some(1) && stderr(&out).contains("only an admin may release it"),
        "{}",
        stderr(&out)
    );
    // So is an admin's hold on a job its owner had held already (QA: it stayed the owner's).
    assert!(d.jobctl(&["release", &theirs]).status.success());
    let own = d.jobctl_tcp(Some(TOKEN_NOBODY), &["hold", &theirs]);
    assert!(own.status.success(), "{}", stderr(&own));
    assert!(d.jobctl(&["hold", &theirs]).status.success());
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["release", &theirs]);
    assert!(
        out.status.code() == Some(1) && stderr(&out).contains("put on hold by root"),
        "{}",
        stderr(&out)
    );
    assert!(
        d.jobctl(&["cancel", &theirs, &long.to_string()])
            .status
            .success()
    );
}

/// `jobctl clean` removes finished jobs for good (record, history, job directory) except those
/// still needed (a dependency of a job not yet ended); only admins clean other users' jobs;
/// `scheduler.keep_finished` does it by itself.
#[test]
fn clean_removes_finished_jobs_but_keeps_what_is_needed() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let ok = d.submit(&d.write("ok.toml", &command_job("echo ok", "")));
    let bad = d.submit(&d.write("bad.toml", &command_job("exit 1", "")));
    d.wait_state(ok, JobState::Succeeded, Duration::from_secs(20));
    d.wait_state(bad, JobState::Failed, Duration::from_secs(20));
    let later = d.write(
        "later.toml",
        &command_job("true", &format!("depends_on = [{ok}]")),
    );
    let out = d.jobctl(&["submit", "--hold", later.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = d.jobctl(&["clean", "--older-than", "1h"]);
    assert!(
        stdout(&out).contains("removed 0 finished jobs"),
        "{}",
        stdout(&out)
    );
    let out = d.jobctl_tcp(Some(TOKEN_NOBODY), &["clean", "--user", "root"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let out = d.jobctl(&["--json", "clean"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["removed"], serde_json::json!([bad]), "{r}");
    assert_eq!(r["kept"][0]["id"], ok, "{r}");
    assert!(
        !d.state.join(format!("jobs/{bad}")).exists() || {
            std::thread::sleep(Duration::from_millis(500));
            !d.state.join(format!("jobs/{bad}")).exists()
        }
    );
    let show = d.jobctl(&["show", &bad.to_string()]);
    assert_eq!(show.status.code(), Some(1));
    assert!(d.all_jobs().iter().all(|j| j.record.id != bad));
    // A directory left behind (the daemon stopped before removing it) goes at the next start.
    let left = d.state.join(format!("jobs/{bad}"));
    std::fs::create_dir_all(left.join("checkpoints")).unwrap();
    let mut d = d;
    d.kill9();
    d.restart();
    wait_for("the left directory to go", Duration::from_secs(10), || {
        !left.exists()
    });
    assert!(
        d.state.join(format!("jobs/{ok}")).exists(),
        "a kept job's directory stays"
    );

    let auto =
        TestDaemon::start_with_config(&["--gpus", "none"], "[scheduler]\nkeep_finished = \"10s\"");
    let id = auto.submit(&auto.write("ok.toml", &command_job("true", "")));
    auto.wait_state(id, JobState::Succeeded, Duration::from_secs(20));
    wait_for(
        "keep_finished to remove it",
        Duration::from_secs(15),
        || auto.all_jobs().is_empty(),
    );
}
