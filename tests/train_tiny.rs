//! The tiny demo job (`jobs/tiny.toml`) trains from scratch through the library: eval loss
//! falls by a stated margin, the output directory loads back, and greedy generation answers
//! held-out prompts correctly.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use jobd::train::{self, StopSignal, WorkerContext, WorkerOutcome, metrics};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ctx(dir: &Path) -> WorkerContext {
    WorkerContext {
        job_dir: dir.to_path_buf(),
        checkpoint_dir: dir.join("checkpoints"),
        output_dir: dir.join("output"),
        stop: Arc::new(StopSignal::default()),
        grace: None,
        threads: Some(2),
        attempt: 1,
    }
}

#[test]
fn tiny_job_learns_the_held_out_rule() {
    let jobs = repo().join("jobs");
    let text = std::fs::read_to_string(jobs.join("tiny.toml")).unwrap();
    let spec = jobd::spec::job::parse_and_resolve("tiny.toml", &text, &jobs).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t0 = std::time::Instant::now();
    let out = train::run(&spec, &ctx(dir.path())).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let planned = spec.training.as_ref().unwrap().max_steps as u64;
    assert_eq!(out, WorkerOutcome::Completed { steps: planned });
    let recs = metrics::read_metrics(dir.path()).unwrap();
    let evals: Vec<f64> = recs.iter().filter_map(|r| r.eval_loss).collect();
    eprintln!("trained in {secs:.1}s; eval losses {evals:?}");
    for r in &recs {
        eprintln!("{}", serde_json::to_string(r).unwrap());
    }
    let first = recs.first().unwrap().loss;
    let last_eval = *evals.last().unwrap();
    assert!(first > 3.0, "starts near ln(vocab): {first}");
    assert!(
        last_eval < 0.5 * first,
        "eval loss {last_eval} vs first train loss {first}"
    );
    let heldout: Vec<serde_json::Value> =
        std::fs::read_to_string(jobs.join("data/tiny_eval.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let g = train::generate::Generator::load(&dir.path().join("output")).unwrap();
    let mut right = 0;
    let n = 40;
    for ex in heldout.iter().take(n) {
        let got = g.generate(ex["prompt"].as_str().unwrap(), 8).unwrap();
        let want = ex["completion"].as_str().unwrap();
        eprintln!("{} -> {got:?} (want {want:?})", ex["prompt"]);
        right += (got.trim() == want.trim()) as usize;
    }
    eprintln!("{right}/{n} held-out prompts answered correctly");
    assert!(right >= n * 9 / 10, "{right}/{n}");
}
