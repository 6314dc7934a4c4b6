//! Recurring jobs through the real daemon, with fast (per-second) schedules.

use std::time::Duration;

use jobd::spec::JobState;
use jobd::spec::api::{ListResponse, SchedulesResponse};

use crate::daemon::*;

fn schedules(d: &TestDaemon) -> SchedulesResponse {
    let out = d.jobctl(&["schedules", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn jobs_of(d: &TestDaemon, schedule: u64) -> Vec<jobd::spec::api::JobView> {
    let out = d.jobctl(&["list", "--all", "--json", "--limit", "1000"]);
    let list: ListResponse = serde_json::from_slice(&out.stdout).unwrap();
    list.jobs
        .into_iter()
        .filter(|j| j.record.schedule_id == Some(schedule))
        .collect()
}

/// A schedule fires on time; with overlap = "skip" no run starts while the previous one is
/// active; pause stops it, resume restarts it, run-now queues at once, delete removes it; an
/// invalid expression is refused at submit; other users cannot change it.
#[test]
fn firing_skip_on_overlap_pause_resume_run_now_delete() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let f = d.write(
        "tick.toml",
        &command_job(
            "echo tick $JOBD_JOB_ID; sleep 2.5",
            "name = \"tick\"\nschedule = \"* * * * * *\"",
        ),
    );
    // validate says the file makes a schedule, and when it fires.
    let out = d.jobctl(&["validate", f.to_str().unwrap()]);
    assert!(
        out.status.success()
            && stdout(&out)
                .contains("recurring \"* * * * * *\" (submit creates a schedule; next run"),
        "{}",
        stdout(&out)
    );
    let out = d.jobctl(&["submit", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("created schedule 1"),
        "{}",
        stderr(&out)
    );
    let sid: u64 = schedule_id(&out);
    wait_for("two runs", Duration::from_secs(15), || {
        jobs_of(&d, sid).len() >= 2
    });
    let s = &schedules(&d).schedules[0];
    assert!(
        s.record.skipped >= 1,
        "firings during a run were skipped: {:?}",
        s.record
    );
    // Never two runs at once.
    let runs = jobs_of(&d, sid);
    let active = runs
        .iter()
        .filter(|j| !j.record.state.is_terminal())
        .count();
    assert!(active <= 1, "{active} runs active at once");
    let reason = d.events(runs.last().unwrap().record.id)[0].reason.clone();
    assert!(
        reason.contains("queued by schedule 1") && reason.contains("scheduled for"),
        "{reason}"
    );

    // Other users may look but not touch.
    let other = d.jobctl_tcp(Some(TOKEN_NOBODY), &["schedule", "pause", &sid.to_string()]);
    assert_eq!(other.status.code(), Some(1));
    assert!(
        stderr(&other).contains("only its owner or an admin"),
        "{}",
        stderr(&other)
    );

    // What submit printed is taken by the schedule commands, and refused by the job ones.
    let printed = format!("schedule:{sid}");
    let out = d.jobctl(&["wait", &printed]);
    assert!(
        out.status.code() == Some(2) && stderr(&out).contains("is a schedule, not a job"),
        "{}",
        stderr(&out)
    );
    assert!(d.jobctl(&["schedule", "pause", &printed]).status.success());
    let n = jobs_of(&d, sid).len();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(jobs_of(&d, sid).len(), n, "a paused schedule does not fire");
    assert!(schedules(&d).schedules[0].record.next_fire.is_none());
    let out = d.jobctl(&["schedule", "run-now", &sid.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(jobs_of(&d, sid).len(), n + 1, "run-now queues a run");
    assert!(
        d.jobctl(&["schedule", "resume", &sid.to_string()])
            .status
            .success()
    );
    assert!(schedules(&d).schedules[0].record.next_fire.is_some());
    assert!(
        d.jobctl(&["schedule", "delete", &sid.to_string()])
            .status
            .success()
    );
    assert!(schedules(&d).schedules.is_empty());
    assert!(jobs_of(&d, sid).len() > n, "past runs stay after delete");

    let bad = d.write(
        "bad.toml",
        &command_job("true", "schedule = \"0 25 * * *\""),
    );
    let out = d.jobctl(&["submit", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("schedule: invalid cron expression"),
        "{}",
        stderr(&out)
    );
    let missing = d.jobctl(&["schedule", "pause", "42"]);
    assert!(
        stderr(&missing).contains("schedule 42 not found"),
        "{}",
        stderr(&missing)
    );
}

/// overlap = "queue" queues a run at every firing even while one is active.
#[test]
fn overlap_queue_queues_every_firing() {
    let d = TestDaemon::start(&["--gpus", "none", "--max-cpu-jobs", "1"]);
    let f = d.write(
        "q.toml",
        &command_job("sleep 5", "schedule = \"* * * * * *\"\noverlap = \"queue\""),
    );
    let sid: u64 = schedule_id(&d.jobctl(&["submit", f.to_str().unwrap()]));
    wait_for("three runs", Duration::from_secs(10), || {
        jobs_of(&d, sid).len() >= 3
    });
    let queued = jobs_of(&d, sid)
        .iter()
        .filter(|j| j.record.state == JobState::Queued)
        .count();
    assert!(queued >= 2, "runs queue up behind the active one");
    assert_eq!(schedules(&d).schedules[0].record.skipped, 0);
    assert!(
        d.jobctl(&["schedule", "delete", &sid.to_string()])
            .status
            .success()
    );
}

/// After downtime, a missed firing runs once at start-up (not one per missed firing); with
/// catch_up = false it does not.
#[test]
fn catch_up_after_a_restart_runs_once() {
    for catch_up in [true, false] {
        let mut d = TestDaemon::start(&["--gpus", "none"]);
        let f = d.write(
            "c.toml",
            &command_job(
                "true",
                // overlap = "queue": a run still active at the stop (on a loaded machine,
                // `true` may not have ended within its 2 s) would otherwise skip the catch-up.
                &format!(
                    "schedule = \"*/2 * * * * *\"\ncatch_up = {catch_up}\noverlap = \"queue\""
                ),
            ),
        );
        let sid: u64 = schedule_id(&d.jobctl(&["submit", f.to_str().unwrap()]));
        wait_for("a first run", Duration::from_secs(10), || {
            !jobs_of(&d, sid).is_empty()
        });
        assert!(d.stop().success());
        // Several firings are missed while the daemon is down.
        std::thread::sleep(Duration::from_secs(5));
        let before = std::time::SystemTime::now();
        d.restart();
        std::thread::sleep(Duration::from_millis(500));
        let runs = jobs_of(&d, sid);
        let caught: Vec<_> = runs
            .iter()
            .filter(|j| {
                d.events(j.record.id)[0]
                    .reason
                    .contains("catch-up of the firing missed")
            })
            .collect();
        if catch_up {
            assert_eq!(caught.len(), 1, "exactly one catch-up run");
            let t = caught[0].record.submitted_at;
            let restart = before
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64;
            assert!(t >= restart - 100, "it ran at start-up");
        } else {
            assert!(caught.is_empty(), "catch_up = false skips missed firings");
        }
        assert!(
            d.jobctl(&["schedule", "delete", &sid.to_string()])
                .status
                .success()
        );
    }
}

/// `base = "@previous"`: each run of a train schedule starts from the last successful run's
/// model; the first starts from `first_base`.
#[test]
fn previous_chains_train_runs() {
    let d = TestDaemon::start(&["--gpus", "none", "--max-cpu-jobs", "1"]);
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let data = repo.join("jobs/data");
    // A first model to start from: a few steps of the tiny demo.
    let tiny = std::fs::read_to_string(repo.join("jobs/tiny.toml")).unwrap();
    let tiny = tiny
        .split("[publish]")
        .next()
        .unwrap()
        .replace("data/tiny_", &format!("{}/tiny_", data.display()));
    let tiny = tiny
        .replace("max_steps = 400", "max_steps = 20")
        .replace("eval_steps = 100", "eval_steps = 20");
    let seed_job = d.submit(&d.write("seed.toml", &tiny));
    assert!(d.jobctl(&["wait", &seed_job.to_string()]).status.success());
    let first_base = d.state.join(format!("jobs/{seed_job}/output"));

    let nightly = format!(
        "name = \"nightly\"\nkind = \"train\"\nschedule = \"*/2 * * * * *\"\n\
         [model]\nbase = \"@previous\"\nfirst_base = \"{}\"\n\
         [data]\ntrain_file = \"{}/tiny_train.jsonl\"\nblock_size = 16\n\
         [training]\nmax_steps = 5\nper_device_train_batch_size = 8\nlearning_rate = 1e-3\nsave_steps = 5\nlogging_steps = 5\n",
        first_base.display(),
        data.display()
    );
    let nightly_file = d.write("nightly.toml", &nightly);
    // `estimate` takes first_base for "@previous" (it used to look for "@previous/config.json").
    let est = d.jobctl(&["estimate", nightly_file.to_str().unwrap()]);
    assert!(est.status.success(), "{}", stderr(&est));
    assert!(
        stderr(&est).contains("estimated for first_base"),
        "{}",
        stderr(&est)
    );
    let out = d.jobctl(&["submit", nightly_file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sid: u64 = schedule_id(&out);
    wait_for("two successful runs", Duration::from_secs(120), || {
        jobs_of(&d, sid)
            .iter()
            .filter(|j| j.record.state == JobState::Succeeded)
            .count()
            >= 2
    });
    assert!(
        d.jobctl(&["schedule", "delete", &sid.to_string()])
            .status
            .success()
    );
    let mut runs: Vec<_> = jobs_of(&d, sid)
        .into_iter()
        .filter(|j| j.record.state == JobState::Succeeded)
        .collect();
    runs.sort_by_key(|j| j.record.id);
    let base_of =
        |j: &jobd::spec::api::JobView| j.record.spec.model.as_ref().unwrap().base.clone().unwrap();
    assert_eq!(
        base_of(&runs[0]),
        first_base,
        "the first run starts from first_base"
    );
    assert_eq!(
        base_of(&runs[1]),
        d.state.join(format!("jobs/{}/output", runs[0].record.id)),
        "the next run starts from the previous run's model"
    );
    assert!(
        runs[1].record.spec.schedule.is_none(),
        "a fired job is an ordinary job"
    );
}
