//! The chat demo (`jobs/tiny-chat.toml`): a model from scratch learns from conversations
//! rendered with ChatML, trained on the assistant's replies only. The output keeps the
//! template (so publishing gives Ollama ChatML), its markers are single special tokens, and
//! a chat reply to held-out sequences is right.

mod common;

use jobd::chat::{CHATML, CHATML_TOKENS};
use jobd::publish::tokenizer::ChatFamily;
use jobd::publish::{self, PublishRequest, store};
use jobd::train;

#[test]
fn tiny_chat_job_learns_to_answer_held_out_conversations() {
    let (spec, dir, recs) = common::train_demo("tiny-chat.toml");
    let jobs = common::repo().join("jobs");
    let evals: Vec<f64> = recs.iter().filter_map(|r| r.eval_loss).collect();
    let first = recs.first().unwrap().loss;
    assert!(
        *evals.last().unwrap() < 0.2 * first,
        "eval {evals:?} vs first {first}"
    );

    let output = dir.path().join("output");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(output.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["chat_template"], CHATML);
    let g = train::generate::Generator::load(&output).unwrap();
    for (id, marker) in CHATML_TOKENS.iter().enumerate() {
        assert_eq!(g.tok.inner.token_to_id(marker), Some(id as u32 + 1));
    }
    let held_out: Vec<serde_json::Value> =
        std::fs::read_to_string(jobs.join("data/tiny_chat_eval.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let (mut right, n) = (0, 40);
    for conv in held_out.iter().take(n) {
        let m = conv["messages"].as_array().unwrap();
        let (ask, want) = (
            m[m.len() - 4]["content"].as_str().unwrap(),
            m[m.len() - 3]["content"].as_str().unwrap(),
        );
        let got = g.chat(ask, 12).unwrap().answer;
        eprintln!("{ask:?} -> {got:?} (want {want:?})");
        right += (got == want) as usize;
    }
    eprintln!("{right}/{n} held-out messages answered correctly");
    assert!(right >= n * 9 / 10, "{right}/{n}");

    // Published, the model gets Ollama's ChatML template and its stop words.
    let models = dir.path().join("ollama");
    let published = publish::publish(
        &PublishRequest {
            model_dir: &output,
            models_dir: &models,
            spec: spec.publish.as_ref().unwrap(),
            read_as: None,
            write_as: None,
        },
        |_| {},
    )
    .unwrap();
    let manifest = store::read_manifest(&published.manifest_path).unwrap();
    let layer = |media: &str| {
        let l = manifest
            .layers
            .iter()
            .find(|l| l.media_type == media)
            .unwrap();
        std::fs::read_to_string(store::blob_path(&models, &l.digest).unwrap()).unwrap()
    };
    assert_eq!(
        layer(store::TEMPLATE_MEDIA_TYPE),
        ChatFamily::ChatMl.template()
    );
    let params: serde_json::Value = serde_json::from_str(&layer(store::PARAMS_MEDIA_TYPE)).unwrap();
    assert_eq!(
        params["stop"],
        serde_json::json!(["<|im_start|>", "<|im_end|>"])
    );
}
