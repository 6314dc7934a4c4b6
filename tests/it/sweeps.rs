//! Sweeps (`jobctl submit --sweep`): one job file, a job per combination of values, queued
//! all or none, told which one they are, and compared side by side (`jobctl sweep`).

use std::time::Duration;

use jobd::spec::JobState;
use jobd::spec::api::SweepView;

use crate::daemon::*;

fn ids(o: &std::process::Output) -> Vec<u64> {
    stdout(o)
        .lines()
        .map(|l| l.parse().unwrap_or_else(|_| panic!("not an id: {l:?}")))
        .collect()
}

/// Every combination is queued, first key slowest; each job sees its values, its place in the
/// sweep and its own name; `sweep` finds the jobs from any of their ids.
#[test]
fn a_sweep_queues_every_combination_and_tells_each_job_which_it_is() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let job = d.write(
        "sw.toml",
        &command_job(
            "echo \"$JOBD_SWEEP_ID $JOBD_SWEEP_INDEX/$JOBD_SWEEP_SIZE $LR $MSG $JOBD_JOB_NAME\"",
            "name = \"sw\"\n",
        ),
    );
    let file = job.to_str().unwrap();
    // A job before it, so the sweep's id is not 1.
    let before = d.submit(&d.write("one.toml", &command_job("true", "")));
    let out = d.jobctl(&[
        "submit",
        file,
        "--sweep",
        "command.env.LR=1e-4,3e-4",
        "--sweep",
        r#"command.env.MSG=["a,b", "c"]"#,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sweep: Vec<u64> = (before + 1..=before + 4).collect();
    assert_eq!(ids(&out), sweep, "stdout: the jobs' ids");
    assert!(
        stderr(&out).contains(&format!("submitted sweep {}: 4 jobs", sweep[0])),
        "{}",
        stderr(&out)
    );
    let args: Vec<String> = sweep.iter().map(u64::to_string).collect();
    let mut wait = vec!["wait"];
    wait.extend(args.iter().map(String::as_str));
    assert!(d.jobctl(&wait).status.success());
    let s0 = sweep[0];
    let expect = [
        format!("{s0} 1/4 1e-4 a,b sw-1"),
        format!("{s0} 2/4 1e-4 c sw-2"),
        format!("{s0} 3/4 3e-4 a,b sw-3"),
        format!("{s0} 4/4 3e-4 c sw-4"),
    ];
    for (id, want) in sweep.iter().zip(expect) {
        assert_eq!(stdout(&d.jobctl(&["logs", &id.to_string()])).trim(), want);
    }

    // Any member's id finds the sweep, in order, with the values of each job.
    let view: SweepView =
        serde_json::from_str(&stdout(&d.jobctl(&["--json", "sweep", &args[2]]))).unwrap();
    assert_eq!(view.id, s0);
    assert_eq!(view.keys, ["command.env.LR", "command.env.MSG"]);
    let got: Vec<(u64, String)> = view.jobs.iter().map(|j| (j.id, j.sweep.label())).collect();
    assert_eq!(
        got[1],
        (s0 + 1, r#"command.env.LR=1e-4, command.env.MSG="c""#.into())
    );
    assert!(view.jobs.iter().all(|j| j.result.is_none()), "no metrics");
    assert_eq!(
        ids(&d.jobctl(&["sweep", &args[3], "--ids"])),
        sweep,
        "--ids, for cancel and wait"
    );
    let table = stdout(&d.jobctl(&["sweep", &args[0]]));
    assert!(
        table.contains("command.env.LR") && table.contains("succeeded"),
        "{table}"
    );
    let show = stdout(&d.jobctl(&["show", &args[1]]));
    assert!(show.contains(&format!("sweep: {s0}, job 2 of 4")), "{show}");
    d.assert_said(sweep[1], &format!("sweep {s0}, job 2 of 4"));

    // A job of no sweep, and no job at all.
    let o = d.jobctl(&["sweep", &before.to_string()]);
    assert!(
        !o.status.success() && stderr(&o).contains("is not part of a sweep"),
        "{}",
        stderr(&o)
    );
    let o = d.jobctl(&["sweep", "999"]);
    assert!(stderr(&o).contains("sweep 999 not found"), "{}", stderr(&o));
}

/// Swept values that may be secrets (environment variables) are hidden from other users and
/// anonymous readers, as the job file is; the owner sees them.
#[test]
fn swept_secrets_are_hidden_from_others() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let job = d.write(
        "sec.toml",
        &command_job("true", "name = \"secret\"\n[resources]\ncpus = 1"),
    );
    let out = d.jobctl_tcp(
        Some(TOKEN_NOBODY),
        &[
            "submit",
            job.to_str().unwrap(),
            "--hold",
            "--sweep",
            "command.env.HF_TOKEN=hf_AAA111,hf_BBB222",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let first = ids(&out)[0].to_string();
    let owner = stdout(&d.jobctl_tcp(Some(TOKEN_NOBODY), &["sweep", &first]));
    assert!(owner.contains("hf_AAA111"), "the owner sees them:\n{owner}");
    for (who, text) in [
        ("another user", stdout(&d.jobctl_tcp(Some(TOKEN_DAEMON), &["sweep", &first]))),
        (
            "another user's --json",
            stdout(&d.jobctl_tcp(Some(TOKEN_DAEMON), &["--json", "sweep", &first])),
        ),
        (
            "another user's show",
            stdout(&d.jobctl_tcp(Some(TOKEN_DAEMON), &["show", &first])),
        ),
        (
            "anonymous sweep",
            raw_http(
                d.addr(),
                format!("GET /api/v1/sweeps/{first} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .1,
        ),
        (
            "anonymous history",
            raw_http(
                d.addr(),
                format!("GET /api/v1/jobs/{first}/events HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .1,
        ),
        (
            "anonymous queue",
            raw_http(
                d.addr(),
                b"GET /api/v1/queue HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
            .1,
        ),
    ] {
        assert!(!text.contains("hf_"), "{who} sees a secret:\n{text}");
    }
    let other = stdout(&d.jobctl_tcp(Some(TOKEN_DAEMON), &["sweep", &first]));
    assert!(other.contains("(hidden)"), "{other}");
}

/// A resubmitted job of a sweep stays in it with the same index (unless `--set` changes what
/// the sweep varies); the sweep's id works after its first job was cleaned away; `--ids
/// --active` gives what is left to cancel.
#[test]
fn a_sweep_outlives_resubmits_and_cleaning() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let job = d.write(
        "sl.toml",
        &command_job(
            "echo task=$JOBD_SWEEP_INDEX/$JOBD_SWEEP_SIZE; sleep $S",
            "name = \"sl\"",
        ),
    );
    let out = d.jobctl(&[
        "submit",
        job.to_str().unwrap(),
        "--sweep",
        "command.env.S=0,60",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (first, second) = (ids(&out)[0], ids(&out)[1]);
    d.wait_state(first, JobState::Succeeded, Duration::from_secs(20));
    d.wait_state(second, JobState::Running, Duration::from_secs(20));

    // `jobctl resubmit ID ARGS...`: the new job's id.
    let resubmit = |args: &[&str]| -> u64 {
        let id = first.to_string();
        let mut all = vec!["resubmit", id.as_str()];
        all.extend(args);
        let out = d.jobctl(&all);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).trim().parse().unwrap()
    };
    let again = resubmit(&[]);
    d.wait_state(again, JobState::Succeeded, Duration::from_secs(20));
    assert_eq!(
        stdout(&d.jobctl(&["logs", &again.to_string()])),
        "task=1/2\n"
    );
    d.assert_said(again, &format!("as job 1 of sweep {first}"));
    let moved = resubmit(&["--set", "command.env.S=0.1"]);
    assert!(
        d.job(moved).record.sweep.is_none(),
        "another point: no sweep"
    );
    let same = resubmit(&["--set", "command.env.S=0", "--hold"]);
    assert!(
        d.job(same).record.sweep.is_some(),
        "the same value: still the sweep's"
    );
    assert!(d.jobctl(&["cancel", &same.to_string()]).status.success());

    let view: SweepView = serde_json::from_str(&stdout(&d.jobctl(&[
        "--json",
        "sweep",
        &second.to_string(),
    ])))
    .unwrap();
    let listed: Vec<u64> = view.jobs.iter().map(|j| j.id).collect();
    assert_eq!(
        listed,
        [first, again, same, second],
        "by index, the copies after the first"
    );

    d.wait_state(moved, JobState::Succeeded, Duration::from_secs(20));
    let out = d.jobctl(&["clean"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(d.all_jobs().iter().all(|j| j.record.id != first), "cleaned");
    let active = d.jobctl(&["sweep", &first.to_string(), "--ids", "--active"]);
    assert_eq!(ids(&active), [second], "{}", stderr(&active));
    let mut cancel = vec!["cancel".to_string()];
    cancel.extend(ids(&active).iter().map(u64::to_string));
    let cancel: Vec<&str> = cancel.iter().map(String::as_str).collect();
    assert!(d.jobctl(&cancel).status.success());
    d.wait_state(second, JobState::Cancelled, Duration::from_secs(20));
}

/// A sweep with one job the daemon refuses queues none, and says which job and why; bad
/// sweeps are refused with what is wrong, by jobctl and by the API.
#[test]
fn a_sweep_is_queued_all_or_none() {
    let d = TestDaemon::start(&["--gpus", "none"]);
    let job = d.write("sw.toml", &command_job("true", "name = \"sw\""));
    let file = job.to_str().unwrap();
    // Only the daemon knows job 99 does not exist: the second job is refused there.
    let out = d.jobctl(&["submit", file, "--sweep", "depends_on=[[], [99]]"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("sweep job 2 (depends_on=[99])") && err.contains("job 99 does not exist"),
        "{err}"
    );
    assert!(d.all_jobs().is_empty(), "nothing queued");

    // jobctl checks each job before sending any.
    let out = d.jobctl(&["submit", file, "--sweep", "priority=1,x"]);
    assert!(
        stderr(&out).contains("sweep job 2 (priority=x)"),
        "{}",
        stderr(&out)
    );
    let out = d.jobctl(&[
        "submit",
        file,
        "--sweep",
        "priority=1,2",
        "--set",
        "priority=3",
    ]);
    assert!(
        stderr(&out).contains("both --set and --sweep"),
        "{}",
        stderr(&out)
    );
    let out = d.jobctl(&["submit", file, "--sweep", "priority=1", "--follow"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");

    // The API refuses what jobctl would not send.
    let body = |sweep: &str| {
        format!(
            r#"{{"job": {{"toml": "kind = \"command\"\n[command]\nargv = [\"true\"]\n", "base_dir": "/tmp"}}, "sweep": {sweep}}}"#
        )
    };
    for (sweep, want) in [
        ("[]", "at least one --sweep"),
        (
            r#"[{"key": "priority", "values": ["-1", "-1"]}]"#,
            "-1 is given twice",
        ),
        (
            r#"[{"key": "priority", "values": ["-1"]}, {"key": "priority", "values": ["-2"]}]"#,
            "swept twice",
        ),
        (r#"[{"key": "priority", "values": ["x"]}]"#, "sweep job 1"),
        (
            r#"[{"key": "a..b", "values": ["1"]}]"#,
            "not a dotted key path",
        ),
        (r#"[{"key": "priority", "values": []}]"#, "empty value"),
        (r#"[{"key": "priority"}]"#, "values"),
    ] {
        let (status, text) =
            post_json(d.addr(), "/api/v1/sweeps", Some(TOKEN_NOBODY), &body(sweep));
        assert_eq!(status, 400, "{sweep}: {text}");
        assert!(text.contains(want), "{sweep}: {text}");
    }
    // The job file goes in `job`, as for POST /jobs.
    let (status, text) = post_json(
        d.addr(),
        "/api/v1/sweeps",
        Some(TOKEN_NOBODY),
        r#"{"toml": "kind = \"command\"", "sweep": []}"#,
    );
    assert!(status == 400 || status == 422, "{status}: {text}");
    assert!(text.contains("toml"), "{text}");
    assert!(d.all_jobs().is_empty(), "nothing queued");
}

/// Train jobs of a sweep: each publishes its model under its own tag, and `sweep` shows their
/// losses with the best (lowest evaluation loss) marked and how to publish it under the file's
/// name.
#[test]
fn a_train_sweep_compares_losses_and_keeps_each_model() {
    let models = tempfile::tempdir().unwrap();
    let d = TestDaemon::publishing_to(models.path());
    let tiny = crate::train::repo().join("jobs/tiny.toml");
    let out = d.jobctl(&[
        "submit",
        tiny.to_str().unwrap(),
        "--set",
        "training.max_steps=30",
        "--set",
        "training.eval_steps=10",
        "--set",
        "training.logging_steps=10",
        "--sweep",
        "training.learning_rate=1e-4,1e-2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sweep = ids(&out);
    assert_eq!(sweep, [1, 2]);
    for id in &sweep {
        d.wait_state(*id, JobState::Succeeded, Duration::from_secs(120));
    }
    for (id, tag) in [(1, "latest-1"), (2, "latest-2")] {
        let published = d.job(id).record.published.expect("published");
        assert_eq!(published.name, format!("jobd/tiny-shift:{tag}"));
    }
    let view: SweepView =
        serde_json::from_str(&stdout(&d.jobctl(&["--json", "sweep", "1"]))).unwrap();
    let results: Vec<_> = view
        .jobs
        .iter()
        .map(|j| j.result.clone().expect("a train job's result"))
        .collect();
    for r in &results {
        assert_eq!(r.step, 30);
        assert!(r.best_eval_loss.unwrap() <= r.eval_loss.unwrap());
    }
    // The jobs' own metrics agree with the summary.
    let m: Vec<serde_json::Value> = std::fs::read_to_string(d.state.join("jobs/2/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let best = m
        .iter()
        .filter_map(|r| r["eval_loss"].as_f64())
        .fold(f64::INFINITY, f64::min);
    assert_eq!(results[1].best_eval_loss, Some(best));
    let winner = if results[0].best_eval_loss < results[1].best_eval_loss {
        1
    } else {
        2
    };

    let out = d.jobctl(&["sweep", "2"]);
    let table = stdout(&out);
    let marked: Vec<&str> = table
        .lines()
        .filter(|l| l.split_whitespace().next().unwrap_or("").ends_with('*'))
        .collect();
    assert_eq!(marked.len(), 1, "{table}");
    assert!(marked[0].starts_with(&format!("{winner}*")), "{table}");
    assert!(table.contains("BEST EVAL"), "{table}");
    assert!(
        stderr(&out).contains(&format!(
            "jobctl publish {winner} --name jobd/tiny-shift:latest`"
        )),
        "{}",
        stderr(&out)
    );
}

/// `estimate --sweep`: what each job of a sweep would need, and where it fits.
#[test]
fn a_sweep_is_estimated_job_by_job() {
    let d = TestDaemon::start(&["--gpus", "fake:24GiB,80GiB"]);
    let tiny = crate::train::repo().join("jobs/tiny.toml");
    let out = d.jobctl(&[
        "--json",
        "estimate",
        tiny.to_str().unwrap(),
        "--set",
        "resources.gpus=1",
        "--sweep",
        "training.per_device_train_batch_size=8,512",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let jobs = v["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    let need = |i: usize| jobs[i]["needed_bytes"].as_u64().unwrap();
    assert!(need(1) > need(0), "a bigger batch needs more: {v}");
    assert_eq!(jobs[0]["gpus"][1]["fit"], "now");
    let table = stdout(&d.jobctl(&[
        "estimate",
        tiny.to_str().unwrap(),
        "--set",
        "resources.gpus=1",
        "--sweep",
        "training.per_device_train_batch_size=8,512",
    ]));
    assert!(
        table.contains("training.per_device_train_batch_size=512") && table.contains("GPU 0, 1"),
        "{table}"
    );
}
