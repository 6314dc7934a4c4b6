//! L0: how Hugging Face's transformers reads the `config.json` fields that the estimate, the
//! trainer and the GGUF exporter must all read the same way: defaults that depend on the
//! model type (Qwen3's head width) and the rotary parameters, which transformers 5 writes as
//! one `rope_parameters` object instead of `rope_theta` and `rope_scaling`.

use serde_json::Value;

/// The head width transformers' `Qwen3Config` gives a `config.json` without `head_dim` (not
/// `hidden_size / num_attention_heads`, as for the other architectures).
pub const QWEN3_HEAD_DIM: u64 = 128;

/// The head width of a configuration without `head_dim`.
pub fn default_head_dim(model_type: &str, hidden_size: u64, num_attention_heads: u64) -> u64 {
    if model_type == "qwen3" {
        QWEN3_HEAD_DIM
    } else {
        hidden_size / num_attention_heads.max(1)
    }
}

/// How many of a Qwen2 model's layers use its sliding window when `use_sliding_window` is
/// on, as transformers decides: those `layer_types` marks `"sliding_attention"` or, without
/// it, those from `max_window_layers` (default 28) on. (Mistral's window is on every layer.)
pub fn qwen2_sliding_layers(
    num_hidden_layers: u64,
    max_window_layers: Option<u64>,
    layer_types: Option<&Value>,
) -> u64 {
    match layer_types.and_then(Value::as_array) {
        Some(types) => types
            .iter()
            .filter(|t| t.as_str() == Some("sliding_attention"))
            .count() as u64,
        None => num_hidden_layers.saturating_sub(max_window_layers.unwrap_or(28)),
    }
}

/// The `model_type`s the trainer implements (the llama family).
pub const MODEL_TYPES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

/// Why the trainer cannot train the model a `config.json` describes, if it cannot: a model
/// type outside [`MODEL_TYPES`], an MLP that is not SiLU-gated or has biases, what Qwen3's
/// layout has not (attention biases, a sliding window), or rotary parameters other than
/// plain, linear or Llama 3.1's. Read as transformers reads the file (a missing `model_type`
/// is a llama, a missing `hidden_act` SiLU). The checks of sizes are the trainer's own.
pub fn unsupported(config: &Value) -> Option<String> {
    let Value::Object(c) = config else {
        return Some("config.json is not a JSON object".into());
    };
    let text = |k: &str| c.get(k).and_then(Value::as_str);
    let model_type = text("model_type").unwrap_or("llama");
    if !MODEL_TYPES.contains(&model_type) {
        return Some(format!(
            "model_type {model_type:?} is not supported (supported: {})",
            MODEL_TYPES.join(", ")
        ));
    }
    if let Some(act) = text("hidden_act").filter(|a| *a != "silu") {
        return Some(format!(
            "hidden_act {act:?} is not supported (only \"silu\")"
        ));
    }
    let yes = |k: &str| c.get(k) == Some(&Value::Bool(true));
    if yes("mlp_bias") {
        return Some("mlp_bias = true is not supported".into());
    }
    if model_type == "qwen2"
        && yes("use_sliding_window")
        && c.get("sliding_window").is_some_and(|w| !w.is_null())
    {
        let layers = c
            .get("num_hidden_layers")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let sliding = qwen2_sliding_layers(
            layers,
            c.get("max_window_layers").and_then(Value::as_u64),
            c.get("layer_types"),
        );
        if sliding > 0 && sliding < layers {
            return Some(format!(
                "qwen2 with its sliding window on {sliding} of its {layers} layers \
                 (max_window_layers, layer_types) is not supported: only on all or none"
            ));
        }
    }
    if model_type == "qwen3" {
        // No released Qwen3 has either, and llama.cpp's qwen3 (what Ollama runs) has
        // neither: a model trained with them could not be published.
        if yes("attention_bias") {
            return Some("qwen3 with attention_bias = true is not supported".into());
        }
        if yes("use_sliding_window") {
            return Some("qwen3 with use_sliding_window = true is not supported".into());
        }
    }
    let theta = c.get("rope_theta").and_then(Value::as_f64);
    let factor_ok = |s: &Value| {
        s.get("factor")
            .and_then(Value::as_f64)
            .is_some_and(|f| f.is_finite() && f > 0.0)
    };
    match rope(theta, c.get("rope_scaling"), c.get("rope_parameters")) {
        Err(e) => Some(e),
        Ok(Rope {
            scaling: Some(s),
            field,
            ..
        }) => {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("");
            if !matches!(kind, "linear" | "llama3") {
                Some(format!("{field} type {kind:?} is not supported"))
            } else if !factor_ok(&s) {
                Some(format!("{field} of type {kind:?} needs a positive factor"))
            } else {
                None
            }
        }
        Ok(_) => None,
    }
}

/// The rotary embedding a configuration asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// The base; `None`: the configuration class's default (10000 for the llama family).
    pub theta: Option<f64>,
    /// The scaling object (`rope_type` or `type`, `factor`, ...); `None` for plain RoPE.
    pub scaling: Option<Value>,
    /// The field it came from, for messages: `"rope_scaling"` or `"rope_parameters"`.
    pub field: &'static str,
}

/// The rotary parameters as transformers resolves them (`convert_rope_params_to_dict`): a
/// legacy `rope_scaling` object, when given, replaces `rope_parameters`; the base is the
/// object's `rope_theta`, else the top-level `rope_theta`. `rope_parameters` nested by layer
/// type (`{"full_attention": {...}, "sliding_attention": {...}}`) must say the same for
/// every type: these models use one rotary embedding in every layer.
pub fn rope(
    rope_theta: Option<f64>,
    rope_scaling: Option<&Value>,
    rope_parameters: Option<&Value>,
) -> Result<Rope, String> {
    let present = |v: Option<&Value>| v.filter(|v| !v.is_null()).cloned();
    let (params, field) = match (present(rope_scaling), present(rope_parameters)) {
        (Some(p), _) => (p, "rope_scaling"),
        (None, Some(p)) => (p, "rope_parameters"),
        (None, None) => {
            return Ok(Rope {
                theta: rope_theta,
                scaling: None,
                field: "rope_scaling",
            });
        }
    };
    let Value::Object(map) = &params else {
        return Err(format!("{field} must be an object, not {params}"));
    };
    let own_keys = ["rope_type", "type", "rope_theta", "factor"];
    let nested = !map.is_empty()
        && !map.keys().any(|k| own_keys.contains(&k.as_str()))
        && map.values().all(|v| v.is_object() || v.is_null());
    let params = if nested {
        let mut kinds = map.values().filter(|v| !v.is_null());
        let first = kinds.next().cloned().unwrap_or(Value::Null);
        if kinds.any(|v| *v != first) {
            return Err(format!(
                "{field} differ between layer types ({}): not supported",
                map.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        first
    } else {
        params
    };
    let theta = match params.get("rope_theta") {
        None | Some(Value::Null) => rope_theta,
        Some(v) => Some(
            v.as_f64()
                .filter(|t| t.is_finite() && *t > 0.0)
                .ok_or_else(|| format!("{field}.rope_theta {v} must be a positive number"))?,
        ),
    };
    let kind = params
        .get("rope_type")
        .or_else(|| params.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    Ok(Rope {
        theta,
        scaling: (kind != "default").then_some(params),
        field,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rotary_parameters_resolve_as_in_transformers() {
        // transformers 4: top-level fields.
        let r = rope(Some(5e5), Some(&Value::Null), None).unwrap();
        assert_eq!((r.theta, r.scaling), (Some(5e5), None));
        // transformers 5: one object, which wins over a top-level base.
        let p = json!({"rope_theta": 1e6, "rope_type": "default"});
        let r = rope(Some(1e4), None, Some(&p)).unwrap();
        assert_eq!((r.theta, r.scaling), (Some(1e6), None));
        let p = json!({"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0});
        let r = rope(None, None, Some(&p)).unwrap();
        assert_eq!((r.theta, r.scaling), (Some(5e5), Some(p.clone())));
        // A legacy rope_scaling replaces rope_parameters.
        let legacy = json!({"type": "linear", "factor": 2.0});
        let r = rope(Some(1e4), Some(&legacy), Some(&p)).unwrap();
        assert_eq!((r.theta, r.scaling), (Some(1e4), Some(legacy)));
        // Nested by layer type: the same for every type, or refused.
        let same = json!({"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
            "sliding_attention": {"rope_theta": 1e6, "rope_type": "default"}});
        assert_eq!(rope(None, None, Some(&same)).unwrap().theta, Some(1e6));
        let differ = json!({"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
            "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}});
        let e = rope(None, None, Some(&differ)).unwrap_err();
        assert!(e.contains("full_attention, sliding_attention"), "{e}");
        assert!(rope(None, None, Some(&json!({"rope_theta": -1.0}))).is_err());
        assert!(rope(None, None, Some(&json!([1]))).is_err());
        assert_eq!(default_head_dim("qwen3", 1024, 16), 128);
    }

    #[test]
    fn architectures_the_trainer_cannot_train_are_named() {
        let ok = json!({"model_type": "qwen3", "hidden_act": "silu", "attention_bias": false,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}});
        assert_eq!(unsupported(&ok), None);
        assert_eq!(
            unsupported(&json!({"hidden_size": 8})),
            None,
            "a llama by default"
        );
        // A Qwen2 window on every layer, or on none (transformers' default max_window_layers
        // of 28 leaves a 24-layer model without one), is fine.
        for (layers, from) in [(4, 0), (24, 28)] {
            let c = json!({"model_type": "qwen2", "num_hidden_layers": layers,
                "use_sliding_window": true, "sliding_window": 8, "max_window_layers": from});
            assert_eq!(unsupported(&c), None);
        }
        assert_eq!(qwen2_sliding_layers(24, None, None), 0);
        assert_eq!(qwen2_sliding_layers(30, None, None), 2);
        assert_eq!(qwen2_sliding_layers(4, Some(0), None), 4);
        for (config, why) in [
            (
                json!({"model_type": "gemma3_text"}),
                "\"gemma3_text\" is not supported",
            ),
            (
                json!({"model_type": "qwen3_moe"}),
                "\"qwen3_moe\" is not supported",
            ),
            (json!({"hidden_act": "gelu_pytorch_tanh"}), "hidden_act"),
            (json!({"mlp_bias": true}), "mlp_bias"),
            (
                json!({"model_type": "qwen3", "attention_bias": true}),
                "attention_bias",
            ),
            (
                json!({"model_type": "qwen3", "use_sliding_window": true}),
                "use_sliding_window",
            ),
            (
                json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
                "\"yarn\"",
            ),
            (
                json!({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}),
                "rope_parameters type \"dynamic\"",
            ),
            (
                json!({"rope_parameters": {"full_attention": {"rope_theta": 1e6},
                    "sliding_attention": {"rope_theta": 1e4}}}),
                "differ between layer types",
            ),
            (json!([]), "not a JSON object"),
            (
                json!({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6}}),
                "rope_parameters of type \"linear\" needs a positive factor",
            ),
            (
                json!({"model_type": "qwen2", "num_hidden_layers": 4, "use_sliding_window": true,
                    "sliding_window": 8, "max_window_layers": 2}),
                "sliding window on 2 of its 4 layers",
            ),
            (
                json!({"model_type": "qwen2", "num_hidden_layers": 2, "use_sliding_window": true,
                    "sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]}),
                "sliding window on 1 of its 2 layers",
            ),
        ] {
            let e = unsupported(&config).unwrap_or_else(|| panic!("{config} accepted"));
            assert!(e.contains(why), "{config}: {e}");
        }
        assert_eq!(default_head_dim("qwen2", 896, 14), 64);
    }
}
