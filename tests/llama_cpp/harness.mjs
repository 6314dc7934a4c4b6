// Runs real llama.cpp (node-llama-cpp's prebuilt CPU build) on a GGUF and answers a list of
// requests with JSON, so Rust tests can compare llama.cpp with the `tokenizers` crate, a
// reference forward pass, or Candle.
//
// Usage: node harness.mjs REQUEST.json   (prints one JSON object on stdout)
//
// REQUEST: {"model": "/path/to/file.gguf", "context_size": 256, "threads": 1, "ops": [OP, ...]}
// OP and its result (in "results", same order):
//   {"op": "info"}  -> {"n_vocab", "vocabulary_type", "bos", "eos", "add_bos", "add_eos",
//                       "train_context_size"}
//   {"op": "tokenize", "text": "...", "special": false}  -> {"ids": [...]}   (no BOS added)
//   {"op": "detokenize", "ids": [...]}             -> {"text": "..."}
//   {"op": "greedy", "prompt": [ids], "n": 16}     -> {"ids": [...]}  argmax continuation
//   {"op": "teacher_forced", "ids": [ids], "logits": false}
//        -> {"top1": [...], "margin": [...], "logits"?: [[...]]}
//        top1[i] is llama.cpp's argmax next token after ids[0..=i]; margin[i] is the gap
//        between the best and second-best logit; "logits" (full rows) only when asked.
// Greedy and teacher-forced decoding take the argmax of the raw logits themselves (ties go to
// the lowest id), so no sampler setting (repeat penalty, top-k, temperature) is involved.
import fs from "node:fs";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const request = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({
    gpu: false,
    build: "never",
    logLevel: process.env.NLC_LOG ?? LlamaLogLevel.error,
});
const model = await llama.loadModel({modelPath: request.model});
// One thread by default: ggml's worker threads spin while waiting, and on a busy 2-core CI
// machine more threads make each evaluation ~1000x slower, not faster.
const context = await model.createContext({
    contextSize: request.context_size ?? 256,
    threads: request.threads ?? 1,
});
const sequence = context.getSequence();

function best(logits) {
    // logits: Map<token, logit> in descending order of logit.
    let top = -Infinity, second = -Infinity, id = -1;
    for (const [token, value] of logits) {
        if (value > top || (value === top && token < id)) {
            second = Math.max(second, top);
            top = value;
            id = token;
        } else if (value > second) {
            second = value;
        }
    }
    return {id, margin: top - second};
}

function denseRow(logits) {
    const row = new Array(logits.size).fill(0);
    for (const [token, value] of logits) row[token] = value;
    return row;
}

// Evaluates `ids` from an empty sequence and returns the logits after each position in
// `want` (a set of indexes).
async function evaluate(ids, want) {
    await sequence.clearHistory();
    const input = ids.map((t, i) => (want.has(i) ? [t, {generateNext: {logits: true}}] : t));
    const out = await sequence.controlledEvaluate(input);
    return ids.map((_, i) => out[i]?.next?.logits);
}

const results = [];
for (const op of request.ops) {
    switch (op.op) {
        case "info": {
            // llama.cpp's n_vocab is the length of a logits row.
            const [row] = await evaluate([model.tokens.bos ?? 0], new Set([0]));
            results.push({
                n_vocab: row.size,
                vocabulary_type: model.tokens.vocabularyType,
                bos: model.tokens.bos,
                eos: model.tokens.eos,
                add_bos: model.tokens.shouldPrependBosToken,
                add_eos: model.tokens.shouldAppendEosToken,
                train_context_size: model.trainContextSize,
            });
            break;
        }
        case "tokenize":
            results.push({ids: Array.from(model.tokenize(op.text, op.special ?? false))});
            break;
        case "detokenize":
            results.push({text: model.detokenize(op.ids, op.special ?? false)});
            break;
        case "greedy": {
            const ids = [...op.prompt];
            const generated = [];
            await sequence.clearHistory();
            let pending = ids.map((t, i) => (i === ids.length - 1 ? [t, {generateNext: {logits: true}}] : t));
            for (let step = 0; step < op.n; step++) {
                const out = await sequence.controlledEvaluate(pending);
                const {id} = best(out[pending.length - 1].next.logits);
                generated.push(id);
                pending = [[id, {generateNext: {logits: true}}]];
            }
            results.push({ids: generated});
            break;
        }
        case "teacher_forced": {
            const all = new Set(op.ids.map((_, i) => i));
            const rows = await evaluate(op.ids, all);
            const top = rows.map(best);
            const result = {top1: top.map(t => t.id), margin: top.map(t => t.margin)};
            if (op.logits) result.logits = rows.map(denseRow);
            results.push(result);
            break;
        }
        default:
            throw new Error(`unknown op ${JSON.stringify(op.op)}`);
    }
}
process.stdout.write(JSON.stringify({results}) + "\n");
await context.dispose();
await model.dispose();
await llama.dispose();
