//! The tiny demo job (`jobs/tiny.toml`) trains from scratch through the library: eval loss
//! falls by a stated margin, the output directory loads back, and greedy generation answers
//! held-out prompts correctly.

mod common;

use jobd::train;

#[test]
fn tiny_job_learns_the_held_out_rule() {
    let (_, dir, recs) = common::train_demo("tiny.toml");
    let jobs = common::repo().join("jobs");
    let evals: Vec<f64> = recs.iter().filter_map(|r| r.eval_loss).collect();
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
