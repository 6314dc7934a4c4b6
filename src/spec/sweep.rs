//! Sweeps: one job file, many jobs — every combination of the values given for some of its
//! keys (`jobctl submit job.toml --sweep training.learning_rate=1e-4,3e-4 --sweep lora.r=8,16`
//! queues four jobs). What Slurm's job arrays and W&B's grid sweeps give: the jobs are queued
//! together or not at all, share a sweep id (their first job's id), and are compared side by
//! side (`jobctl sweep ID`).

use serde::{Deserialize, Serialize};

use super::JobId;

/// The most jobs one sweep may queue: a typo (`--sweep seed=1..1000` spelled as a list)
/// should not flood a shared queue.
pub const MAX_SWEEP_JOBS: usize = 256;

/// Why a job file with a schedule cannot be swept.
pub const NO_SCHEDULE: &str = "a sweep's jobs would have a schedule: a sweep queues jobs now, \
     and a job file with `schedule` makes a recurring schedule instead; remove `schedule` from \
     the file (or do not sweep it), or submit one schedule per variant with --set";

/// One swept key and the values it takes, as TOML value texts (`3e-4`, `"q_proj"`, `[8, 16]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepAxis {
    /// Dotted key path in the job file, as `--set` takes it.
    pub key: String,
    /// The values, each as `--set` would take it after `KEY=`.
    pub values: Vec<String>,
}

/// One key's value in one job of a sweep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepValue {
    pub key: String,
    pub value: String,
}

/// What a job of a sweep records about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepMember {
    /// The sweep: its first job's id.
    pub id: JobId,
    /// This job's place in it, from 1.
    pub index: u32,
    /// How many jobs the sweep queued.
    pub size: u32,
    /// This job's values of the swept keys, in the order the axes were given.
    pub values: Vec<SweepValue>,
}

impl SweepMember {
    /// `key=value, key=value`, for tables and messages.
    pub fn label(&self) -> String {
        label(&self.values)
    }

    /// Hides the values of keys that may hold secrets (environment variables, a notifier's
    /// arguments), as the job's spec is hidden from those who do not own it; whether any was.
    pub fn hide_secrets(&mut self) -> bool {
        let mut hidden = false;
        for v in &mut self.values {
            if may_hold_secrets(&v.key) {
                v.value = "(hidden)".into();
                hidden = true;
            }
        }
        hidden
    }
}

/// Whether a key's value is hidden from other users: `command.env` and `[notify]` (and the
/// tables holding them).
pub fn may_hold_secrets(key: &str) -> bool {
    key == "command"
        || key == "notify"
        || key == "command.env"
        || key.starts_with("command.env.")
        || key.starts_with("notify.")
}

/// `key=value, key=value`.
pub fn label(values: &[SweepValue]) -> String {
    values
        .iter()
        .map(|v| format!("{}={}", v.key, v.value))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether two dotted keys name the same value or one holds the other (`training` and
/// `training.learning_rate`): setting one changes the other.
pub fn keys_overlap(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim(), b.trim());
    let within = |inner: &str, outer: &str| {
        inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    };
    within(a, b) || within(b, a)
}

/// Whether the job file `text` still has each of `values` (a job of a sweep resubmitted with
/// `--set`: if it changed none of them, it is still that job of the sweep). A string in the
/// file matches the value's text, as `--set` makes a string of it there.
pub fn values_hold(text: &str, values: &[SweepValue]) -> bool {
    let Ok(doc) = text.parse::<toml::Table>() else {
        return false;
    };
    values.iter().all(|v| {
        let (parents, last) = match v.key.rsplit_once('.') {
            Some((p, l)) => (p.split('.').collect::<Vec<_>>(), l),
            None => (Vec::new(), v.key.as_str()),
        };
        let Some(found) = parents
            .iter()
            .try_fold(&doc, |t, k| t.get(*k)?.as_table())
            .and_then(|t| t.get(last))
        else {
            return false;
        };
        let given = super::job::toml_value(&v.value);
        match found {
            toml::Value::String(s) => {
                given.as_ref().and_then(toml::Value::as_str) == Some(s.as_str()) || *s == v.value
            }
            other => given.as_ref() == Some(other),
        }
    })
}

/// Why a sweep cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SweepError(pub String);

impl SweepAxis {
    /// Parses `KEY=V1,V2,...`, or `KEY=[V1, V2, ...]` (a TOML array: for values holding
    /// commas, such as strings or lists).
    pub fn parse(arg: &str) -> Result<SweepAxis, SweepError> {
        let Some((key, raw)) = arg.split_once('=') else {
            return Err(SweepError(format!(
                "--sweep {arg:?}: write KEY=V1,V2,..., e.g. training.learning_rate=1e-4,3e-4"
            )));
        };
        let key = key.trim();
        let raw = raw.trim();
        let values: Vec<String> = if raw.starts_with('[') {
            let array = format!("v = {raw}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .and_then(|v| match v {
                    toml::Value::Array(a) => Some(a),
                    _ => None,
                })
                .ok_or_else(|| {
                    SweepError(format!(
                        "--sweep {key}: {raw} is not a TOML array of values, e.g. \
                         [\"q_proj\", \"v_proj\"] or [[\"q_proj\"], [\"q_proj\", \"v_proj\"]]"
                    ))
                })?;
            array.iter().map(value_text).collect()
        } else {
            let values: Vec<String> = raw.split(',').map(|v| v.trim().to_string()).collect();
            // `{a=1, b=2},{...}` split at its commas: what was meant is a TOML array.
            if let Some(v) = values.iter().find(|v| {
                v.starts_with(['{', '[', '"', '\'']) && super::job::toml_value(v).is_none()
            }) {
                return Err(SweepError(format!(
                    "--sweep {key}: {v} is no TOML value once the values are split at their \
                     commas; give values holding commas as a TOML array, e.g. \
                     {key}=[{{a = 1, b = 2}}, {{a = 3, b = 4}}]"
                )));
            }
            values
        };
        SweepAxis {
            key: key.split('.').map(str::trim).collect::<Vec<_>>().join("."),
            values,
        }
        .checked()
    }

    /// The axis, if its key is a dotted path and its values are there, non-empty and
    /// different (an axis may come from the API, not from [`SweepAxis::parse`]).
    pub fn checked(self) -> Result<SweepAxis, SweepError> {
        let key = &self.key;
        if key.is_empty() || key.split('.').any(|k| k.trim().is_empty()) {
            return Err(SweepError(format!(
                "--sweep {key:?}: not a dotted key path"
            )));
        }
        if self.values.is_empty() || self.values.iter().any(|v| v.trim().is_empty()) {
            return Err(SweepError(format!(
                "--sweep {key}: has an empty value; give values separated by commas, e.g. \
                 {key}=1,2,3"
            )));
        }
        if let Some(bad) = key.split('.').find(|k| {
            !k.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        }) {
            return Err(SweepError(format!(
                "--sweep {key:?}: {bad:?} is not a key of a job file (letters, digits, '_' and \
                 '-')"
            )));
        }
        // The same value spelled twice (`3e-4` and `0.0003`) would run the same job twice.
        let parsed: Vec<toml::Value> = self
            .values
            .iter()
            .map(|v| {
                if v.contains('\n') {
                    return Err(SweepError(format!(
                        "--sweep {key}: {v:?} holds a line break; give one TOML value per item"
                    )));
                }
                Ok(super::job::toml_value(v).unwrap_or_else(|| toml::Value::String(v.clone())))
            })
            .collect::<Result<_, _>>()?;
        for (i, v) in self.values.iter().enumerate() {
            if parsed[..i].contains(&parsed[i]) {
                return Err(SweepError(format!(
                    "--sweep {key}: {v} is given twice (it would run the same job twice)"
                )));
            }
        }
        Ok(self)
    }
}

/// A TOML value as text `--set` reads back as the same value (strings quoted, tables inline).
fn value_text(v: &toml::Value) -> String {
    v.to_string()
}

/// Every combination of the axes' values, the first axis varying slowest (as nested loops
/// written in the order the axes were given). Checks the keys and the size.
pub fn grid(axes: &[SweepAxis], set_keys: &[&str]) -> Result<Vec<Vec<SweepValue>>, SweepError> {
    if axes.is_empty() {
        return Err(SweepError(
            "a sweep needs at least one --sweep KEY=V1,V2".into(),
        ));
    }
    for (i, a) in axes.iter().enumerate() {
        a.clone().checked()?;
        if let Some(b) = axes[..i].iter().find(|b| keys_overlap(&b.key, &a.key)) {
            return Err(SweepError(if b.key == a.key {
                format!(
                    "--sweep {}: the key is swept twice; give all its values in one --sweep",
                    a.key
                )
            } else {
                format!(
                    "--sweep {} and --sweep {} change the same part of the file (one holds the \
                     other); sweep one of them",
                    b.key, a.key
                )
            }));
        }
        if let Some(k) = set_keys.iter().find(|k| keys_overlap(k, &a.key)) {
            let k = k.trim();
            return Err(SweepError(if k == a.key {
                format!("{k} is given by both --set and --sweep: drop one of them")
            } else {
                format!(
                    "--set {k} and --sweep {} change the same part of the file (one holds the \
                     other): the sweep's values would replace the --set; drop one of them",
                    a.key
                )
            }));
        }
    }
    let size = axes
        .iter()
        .try_fold(1usize, |n, a| n.checked_mul(a.values.len()))
        .filter(|n| *n <= MAX_SWEEP_JOBS)
        .ok_or_else(|| {
            let sizes: Vec<String> = axes.iter().map(|a| a.values.len().to_string()).collect();
            SweepError(format!(
                "the sweep makes {} jobs; at most {MAX_SWEEP_JOBS} may be queued as one sweep",
                sizes.join(" × ")
            ))
        })?;
    let mut points = Vec::with_capacity(size);
    for n in 0..size {
        // Mixed radix: the last axis is the fastest digit.
        let mut rest = n;
        let mut point = vec![None; axes.len()];
        for (i, a) in axes.iter().enumerate().rev() {
            point[i] = Some(SweepValue {
                key: a.key.clone(),
                value: a.values[rest % a.values.len()].clone(),
            });
            rest /= a.values.len();
        }
        points.push(
            point
                .into_iter()
                .map(|v| v.expect("every axis set"))
                .collect(),
        );
    }
    Ok(points)
}

/// The `--set` changes that make job `index` (from 1) of a sweep: its values, plus what keeps
/// the jobs apart where the file would make them collide — its name gets `-INDEX`, and its
/// Ollama model (when it publishes one and the sweep does not vary it) the tag `TAG-INDEX`, so
/// that each job's model is kept and the best can be published under the real name later
/// (`jobctl publish ID --name`).
pub fn member_overrides(
    point: &[SweepValue],
    index: usize,
    name: &str,
    ollama_name: Option<&str>,
) -> Vec<String> {
    // A key swept itself or within a swept table (`--sweep 'publish=[{...}]'`) is the sweep's.
    let swept = |key: &str| point.iter().any(|v| keys_overlap(&v.key, key));
    let mut set: Vec<String> = point
        .iter()
        .map(|v| format!("{}={}", v.key, v.value))
        .collect();
    if !swept("name") {
        let suffix = format!("-{index}");
        // Job names hold at most 128 characters.
        let keep: String = name
            .chars()
            .take(128usize.saturating_sub(suffix.len()))
            .collect();
        set.push(format!("name={}", toml::Value::String(keep + &suffix)));
    }
    if let Some(model) = ollama_name
        && !swept("publish.ollama_name")
    {
        set.push(format!(
            "publish.ollama_name={}",
            toml::Value::String(tagged(model, index))
        ));
    }
    set
}

/// One job of a sweep, ready to check and submit.
#[derive(Debug, Clone)]
pub struct Member {
    /// The job file's text with the job's values (and its name and Ollama tag) set.
    pub text: String,
    /// Its values of the swept keys.
    pub values: Vec<SweepValue>,
    /// How messages name it: `job.toml, sweep job 2 (lr=3e-4)`.
    pub origin: String,
}

/// The jobs of a sweep of the job file `text` (`origin` names it in messages, `stem` is the
/// name a file without `name` gets): one per combination of the axes' values. `set_keys` are
/// the keys `--set` already changed, which a sweep may not also vary.
pub fn members(
    text: &str,
    origin: &str,
    stem: &str,
    axes: &[SweepAxis],
    set_keys: &[&str],
) -> Result<Vec<Member>, SweepError> {
    let points = grid(axes, set_keys)?;
    // What the file names before the sweep's changes: each job gets its own variant of both.
    let doc: toml::Table = text
        .parse()
        .map_err(|e| SweepError(format!("invalid job file:\n{origin}: {e}")))?;
    let name = doc
        .get("name")
        .and_then(toml::Value::as_str)
        .unwrap_or(stem);
    let model = doc
        .get("publish")
        .and_then(|p| p.get("ollama_name"))
        .and_then(toml::Value::as_str);
    points
        .into_iter()
        .enumerate()
        .map(|(i, values)| {
            let origin = format!("{origin}, sweep job {} ({})", i + 1, label(&values));
            let set = member_overrides(&values, i + 1, name, model);
            // The changes are the sweep's (and the names it gives), not `--set`s.
            let text = super::job::apply_overrides(text, &origin, &set).map_err(|e| {
                SweepError(match e.0.strip_prefix("--set ") {
                    Some(rest) => format!("--sweep {rest}"),
                    None => e.0,
                })
            })?;
            Ok(Member {
                text,
                values,
                origin,
            })
        })
        .collect()
}

/// `model[:tag]` with the tag `TAG-INDEX` (`latest` when it has none), cut to Ollama's 80
/// characters for a tag.
fn tagged(model: &str, index: usize) -> String {
    let last_slash = model.rfind('/');
    let (path, tag) = match model.rfind(':') {
        Some(colon) if last_slash.is_none_or(|sl| colon > sl) => {
            (&model[..colon], &model[colon + 1..])
        }
        _ => (model, super::publish::DEFAULT_TAG),
    };
    let suffix = format!("-{index}");
    let keep: String = tag.chars().take(80 - suffix.len()).collect();
    format!("{path}:{keep}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn axis(s: &str) -> SweepAxis {
        SweepAxis::parse(s).unwrap()
    }

    #[test]
    fn parses_lists_and_toml_arrays() {
        assert_eq!(
            axis("training.learning_rate = 1e-4, 3e-4"),
            SweepAxis {
                key: "training.learning_rate".into(),
                values: vec!["1e-4".into(), "3e-4".into()]
            }
        );
        let a = axis(r#"lora.target_modules=[["q_proj"], ["q_proj", "v_proj"]]"#);
        assert_eq!(a.values, vec![r#"["q_proj"]"#, r#"["q_proj", "v_proj"]"#]);
        let a = axis(r#"command.env.MSG=["a,b", "c"]"#);
        assert_eq!(a.values, vec![r#""a,b""#, r#""c""#]);
        let a = axis(r#"command=[{argv=["echo","a"], env={A="1"}}]"#);
        let back: toml::Table = format!("v = {}", a.values[0]).parse().unwrap();
        let want: toml::Table = r#"v = {argv=["echo","a"], env={A="1"}}"#.parse().unwrap();
        assert_eq!(back, want, "{}", a.values[0]);
    }

    #[test]
    fn bad_axes_say_what_is_wrong() {
        let err = |s: &str| SweepAxis::parse(s).unwrap_err().0;
        assert!(err("lr").contains("write KEY=V1,V2"), "{}", err("lr"));
        assert!(err("a..b=1,2").contains("not a dotted key path"));
        assert!(err("lr=1,,2").contains("empty value"));
        assert!(err("lr=").contains("empty value"));
        assert!(err("lr=[1, 2").contains("not a TOML array"));
        assert!(err("seed=1,2,1").contains("1 is given twice"));
        assert!(err("lr=3e-4,0.0003").contains("0.0003 is given twice"));
        assert!(err(r#"name=a,"a""#).contains("given twice"));
        let api = SweepAxis {
            key: "name=zz".into(),
            values: vec!["1".into()],
        };
        assert!(api.checked().unwrap_err().0.contains("is not a key"));
        let api = SweepAxis {
            key: "priority".into(),
            values: vec!["0\nname=\"inj\"".into()],
        };
        assert!(api.checked().unwrap_err().0.contains("line break"));
    }

    #[test]
    fn grid_is_every_combination_first_axis_slowest() {
        let points = grid(&[axis("a=1,2"), axis("b=x,y,z")], &[]).unwrap();
        let labels: Vec<String> = points.iter().map(|p| label(p)).collect();
        assert_eq!(
            labels,
            [
                "a=1, b=x", "a=1, b=y", "a=1, b=z", "a=2, b=x", "a=2, b=y", "a=2, b=z"
            ]
        );
    }

    #[test]
    fn grid_refuses_repeats_conflicts_and_floods() {
        let e = grid(&[axis("a=1,2"), axis("a=3")], &[]).unwrap_err().0;
        assert!(e.contains("swept twice"), "{e}");
        let e = grid(&[axis("a=1,2")], &["a"]).unwrap_err().0;
        assert!(e.contains("both --set and --sweep"), "{e}");
        // One holding the other: the sweep's table would replace the --set silently.
        let e = grid(
            &[axis("training=[{max_steps=10}]")],
            &["training.learning_rate"],
        );
        assert!(e.unwrap_err().0.contains("change the same part"));
        let e = grid(&[axis("a.b=1"), axis("a=[{b=2}]")], &[])
            .unwrap_err()
            .0;
        assert!(e.contains("change the same part"), "{e}");
        assert!(grid(&[axis("a.b=1"), axis("a.bc=2")], &["a.b2"]).is_ok());
        assert!(keys_overlap("command.env", "command.env.X"));
        assert!(!keys_overlap("command.env", "command.environment"));
        let many: Vec<String> = (0..17).map(|i| i.to_string()).collect();
        let a = axis(&format!("a={}", many.join(",")));
        let b = axis(&format!("b={}", many.join(",")));
        let e = grid(&[a.clone(), b], &[]).unwrap_err().0;
        assert!(
            e.contains("17 × 17 jobs") && e.contains("at most 256"),
            "{e}"
        );
        assert_eq!(grid(&[a], &[]).unwrap().len(), 17);
        assert!(grid(&[], &[]).is_err());
    }

    #[test]
    fn members_are_the_file_with_each_point_set() {
        let text = "name = \"tiny\"\nkind = \"command\"\n[command]\nargv = [\"true\"]\n";
        let m = members(
            text,
            "t.toml",
            "t",
            &[axis("command.env.LR=1e-4,3e-4")],
            &[],
        )
        .unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].origin, "t.toml, sweep job 2 (command.env.LR=3e-4)");
        let doc: toml::Table = m[1].text.parse().unwrap();
        assert_eq!(doc["name"].as_str(), Some("tiny-2"));
        assert_eq!(doc["command"]["env"]["LR"].as_str(), Some("3e-4"));
        // No name in the file: the stem is the base of each job's.
        let m = members(
            "kind = \"command\"",
            "t.toml",
            "t",
            &[axis("priority=1,2")],
            &[],
        );
        let doc: toml::Table = m.unwrap()[0].text.parse().unwrap();
        assert_eq!(doc["name"].as_str(), Some("t-1"));
        assert_eq!(doc["priority"].as_integer(), Some(1));
        let e = members("kind = ", "t.toml", "t", &[axis("a=1")], &[]).unwrap_err();
        assert!(e.0.starts_with("invalid job file:\nt.toml:"), "{e}");
    }

    #[test]
    fn values_hold_while_the_file_keeps_them() {
        let text = "priority = 3\n[command]\nargv = [\"true\"]\nenv = { LR = \"1e-4\" }\n";
        let v = |key: &str, value: &str| SweepValue {
            key: key.into(),
            value: value.into(),
        };
        assert!(values_hold(
            text,
            &[v("priority", "3"), v("command.env.LR", "1e-4")]
        ));
        assert!(values_hold(text, &[v("command.env.LR", "\"1e-4\"")]));
        assert!(!values_hold(text, &[v("priority", "4")]));
        assert!(!values_hold(text, &[v("command.env.LR", "3e-4")]));
        assert!(!values_hold(text, &[v("command.env.X", "1")]));
    }

    #[test]
    fn a_list_split_inside_a_table_asks_for_an_array() {
        let e = SweepAxis::parse(r#"command={argv=["a"], env={K="a"}},{argv=["b"]}"#).unwrap_err();
        assert!(e.0.contains("as a TOML array"), "{e}");
    }

    #[test]
    fn members_get_their_own_names_and_models() {
        let point = vec![SweepValue {
            key: "training.learning_rate".into(),
            value: "3e-4".into(),
        }];
        assert_eq!(
            member_overrides(&point, 2, "tiny", Some("me/tiny-lora")),
            [
                "training.learning_rate=3e-4",
                "name=\"tiny-2\"",
                "publish.ollama_name=\"me/tiny-lora:latest-2\""
            ]
        );
        assert_eq!(
            member_overrides(&point, 12, "t", Some("host:5000/me/m:v1"))[2],
            "publish.ollama_name=\"host:5000/me/m:v1-12\""
        );
        let long = "n".repeat(128);
        let set = member_overrides(&point, 3, &long, None);
        assert_eq!(set.len(), 2);
        assert_eq!(set[1], format!("name=\"{}-3\"", "n".repeat(126)));
        // A swept name or model is the user's choice.
        let point = vec![
            SweepValue {
                key: "name".into(),
                value: "a".into(),
            },
            SweepValue {
                key: "publish.ollama_name".into(),
                value: "m:a".into(),
            },
        ];
        assert_eq!(member_overrides(&point, 1, "x", Some("m")).len(), 2);
        // A swept `[publish]` table names the model itself.
        let table = vec![SweepValue {
            key: "publish".into(),
            value: r#"{ ollama_name = "qa/first:v" }"#.into(),
        }];
        assert!(
            !member_overrides(&table, 1, "x", Some("m"))
                .iter()
                .any(|s| s.starts_with("publish.ollama_name"))
        );
        let mut m = SweepMember {
            id: 1,
            index: 1,
            size: 1,
            values: vec![
                SweepValue {
                    key: "command.env.TOKEN".into(),
                    value: "s3cret".into(),
                },
                SweepValue {
                    key: "training.seed".into(),
                    value: "7".into(),
                },
            ],
        };
        assert!(m.hide_secrets());
        assert_eq!(m.label(), "command.env.TOKEN=(hidden), training.seed=7");
        let tag = tagged(&format!("m:{}", "t".repeat(80)), 7);
        assert!(
            crate::spec::publish::ModelName::parse(&tag).is_ok(),
            "{tag}"
        );
    }
}
