//! Parsing TOML into typed structs with errors that name the file, line, column and key.
//!
//! Used for job files and the daemon config. Serde errors from `toml` carry a byte span; this
//! module turns spans into `line:column` and into the dotted key path (`resources.gpus`) so that
//! every message names what is wrong and where, including errors found after parsing
//! (semantic validation reports a key path, which is mapped back to its span).

use std::fmt;
use std::ops::Range;

use serde::de::DeserializeOwned;
use serde_spanned::Spanned;
use toml::de::{DeTable, DeValue};

/// One problem in a TOML document.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Problem {
    /// Dotted key path (`resources.vram`, `command.argv[0]`), when known.
    pub key: Option<String>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    pub message: String,
}

/// All problems found in one document, with the name of the document.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
pub struct SourceError {
    pub origin: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, "{line}:{column}: ")?;
        }
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            if p.line.is_some() {
                write!(f, "{}:{p}", self.origin)?;
            } else {
                write!(f, "{}: {p}", self.origin)?;
            }
        }
        Ok(())
    }
}

/// A semantic problem found after deserializing: the key path it concerns and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub key: String,
    pub message: String,
}

impl Issue {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Issue {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A parsed TOML document kept with its text, so later problems can be located.
pub struct Source<'a> {
    origin: &'a str,
    text: &'a str,
    table: Option<Spanned<DeTable<'a>>>,
}

/// A syntax error's message, with the key it is about where the parser's message does not
/// name it ("duplicate key" → "duplicate key `lr`").
fn name_the_key(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    let key = e
        .span()
        .and_then(|span| text.get(span))
        .map(|k| k.lines().next().unwrap_or("").trim())
        .filter(|k| !k.is_empty() && k.len() <= 80);
    match key {
        Some(k) if message.starts_with("duplicate key") && !message.contains('`') => {
            format!("{message} `{k}`")
        }
        _ => message.to_string(),
    }
}

impl<'a> Source<'a> {
    /// Parses `text` (named `origin` in messages) as TOML syntax.
    pub fn parse(origin: &'a str, text: &'a str) -> Result<Self, SourceError> {
        match DeTable::parse(text) {
            Ok(table) => Ok(Source {
                origin,
                text,
                table: Some(table),
            }),
            Err(e) => Err(SourceError {
                origin: origin.to_string(),
                problems: vec![problem_at(text, e.span(), None, &name_the_key(text, &e))],
            }),
        }
    }

    /// Deserializes the document into `T`, naming the key of any type or field error.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, SourceError> {
        toml::from_str::<T>(self.text).map_err(|e| {
            // A field missing at the top level spans the whole file, whose first key is not
            // the one to blame: name the missing field itself.
            let missing_at_top =
                e.message().starts_with("missing field") && e.span().is_some_and(|s| s.start == 0);
            let key = if missing_at_top {
                e.message().split('`').nth(1).map(str::to_string)
            } else {
                e.span().and_then(|span| self.key_at(span))
            };
            SourceError {
                origin: self.origin.to_string(),
                problems: vec![problem_at(self.text, e.span(), key, &suggest(e.message()))],
            }
        })
    }

    /// Turns semantic issues into located problems.
    pub fn locate(&self, issues: Vec<Issue>) -> SourceError {
        let problems = issues
            .into_iter()
            .map(|issue| {
                let span = self.span_of(&issue.key);
                problem_at(self.text, span, Some(issue.key), &issue.message)
            })
            .collect();
        SourceError {
            origin: self.origin.to_string(),
            problems,
        }
    }

    /// The span of the value at a dotted key path (falls back to the nearest existing parent).
    fn span_of(&self, key: &str) -> Option<Range<usize>> {
        let root = self.table.as_ref()?;
        let mut best = None;
        let mut current: Option<&DeValue<'_>> = None;
        let mut table: Option<&DeTable<'_>> = Some(root.get_ref());
        for segment in split_key(key) {
            let next = match (segment, table, current) {
                (Segment::Key(k), Some(t), _) => t
                    .iter()
                    .find(|(name, _)| name.get_ref().as_ref() == k)
                    .map(|(_, v)| v),
                (Segment::Index(i), _, Some(DeValue::Array(a))) => a.get(i),
                _ => None,
            };
            let Some(value) = next else { break };
            best = Some(value.span());
            current = Some(value.get_ref());
            table = match value.get_ref() {
                DeValue::Table(t) => Some(t),
                _ => None,
            };
        }
        best
    }

    /// The deepest dotted key whose value contains `span`. Table values span only their
    /// header, so every table is searched.
    fn key_at(&self, span: Range<usize>) -> Option<String> {
        fn contains(r: &Range<usize>, span: &Range<usize>) -> bool {
            r.start <= span.start && span.end <= r.end.max(r.start + 1)
        }
        fn search(value: &DeValue<'_>, span: &Range<usize>, key: &str) -> Option<String> {
            match value {
                DeValue::Table(t) => t.iter().find_map(|(name, v)| {
                    let k = if key.is_empty() {
                        name.get_ref().to_string()
                    } else {
                        format!("{key}.{}", name.get_ref())
                    };
                    search(v.get_ref(), span, &k).or_else(|| {
                        (contains(&v.span(), span) || contains(&name.span(), span)).then_some(k)
                    })
                }),
                DeValue::Array(a) => a.iter().enumerate().find_map(|(i, item)| {
                    let k = format!("{key}[{i}]");
                    search(item.get_ref(), span, &k)
                        .or_else(|| contains(&item.span(), span).then_some(k))
                }),
                _ => None,
            }
        }
        let root = DeValue::Table(self.table.as_ref()?.get_ref().clone());
        search(&root, &span, "")
    }
}

enum Segment<'k> {
    Key(&'k str),
    Index(usize),
}

/// Splits `a.b[2].c` into segments.
fn split_key(key: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in key.split('.') {
        let mut rest = part;
        if let Some(open) = rest.find('[') {
            out.push(Segment::Key(&rest[..open]));
            rest = &rest[open..];
            while let Some(close) = rest.find(']') {
                if let Ok(i) = rest[1..close].parse() {
                    out.push(Segment::Index(i));
                }
                rest = &rest[close + 1..];
                if !rest.starts_with('[') {
                    break;
                }
            }
        } else {
            out.push(Segment::Key(rest));
        }
    }
    out
}

/// Names that users of other tools (Hugging Face `TrainingArguments` above all) write where
/// jobd has the setting under another name or none: `(name, a field of the table where it
/// applies, what to say)`.
const OTHER_TOOLS_NAMES: &[(&str, &str, &str)] = &[
    ("bf16", "dtype", "jobd spells it dtype = \"bf16\""),
    ("fp16", "dtype", "jobd spells it dtype = \"f16\""),
    (
        "save_strategy",
        "save_steps",
        "jobd saves a checkpoint every save_steps steps",
    ),
    (
        "optim",
        "adam_beta1",
        "jobd's optimizer is AdamW (adam_beta1, adam_beta2, adam_epsilon, weight_decay)",
    ),
    (
        "output_dir",
        "save_steps",
        "jobd writes the model and checkpoints into the job's own directory",
    ),
];

/// serde's "unknown field `x`, expected one of `a`, `b`, ..." (or "unknown variant") with the
/// list replaced by what jobd has for a name other tools use, or by the closest expected name
/// when one is close (same first letter, Jaro–Winkler ≥ 0.8: a misspelling); otherwise
/// unchanged.
fn suggest(message: &str) -> String {
    let Some((what, rest)) = ["unknown field `", "unknown variant `"]
        .iter()
        .find_map(|p| message.strip_prefix(p).map(|r| (*p, r)))
    else {
        return message.to_string();
    };
    let Some((name, expected)) = rest.split_once('`') else {
        return message.to_string();
    };
    // The expected names are the backquoted words after the unknown one.
    let names: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let unknown = format!("{what}{name}`");
    if let Some((_, _, hint)) = OTHER_TOOLS_NAMES
        .iter()
        .find(|(other, field, _)| *other == name && names.contains(field))
    {
        return format!("{unknown}; {hint}");
    }
    let best = names
        .iter()
        .filter(|n| n.chars().next() == name.chars().next())
        .map(|n| (strsim::jaro_winkler(name, n), *n))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((_, n)) => format!("{unknown}; did you mean `{n}`?"),
        // Keys jobd records in a stored job, not for job files, are not offered.
        None => INTERNAL_KEYS.iter().fold(message.to_string(), |m, k| {
            m.replace(&format!(", `{k}`"), "")
        }),
    }
}

/// Fields of the stored job spec that job files must not set (serde lists them as expected).
const INTERNAL_KEYS: &[&str] = &["base_dir"];

fn problem_at(
    text: &str,
    span: Option<Range<usize>>,
    key: Option<String>,
    message: &str,
) -> Problem {
    let (line, column) = match span {
        Some(span) => {
            let (l, c) = line_col(text, span.start);
            (Some(l), Some(c))
        }
        None => (None, None),
    };
    Problem {
        key,
        line,
        column,
        message: message.trim().to_string(),
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    pub struct Doc {
        name: String,
        #[serde(default)]
        inner: Inner,
    }
    #[derive(serde::Deserialize, Debug, Default)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    pub struct Inner {
        #[serde(default)]
        count: u32,
        #[serde(default)]
        list: Vec<String>,
    }

    #[test]
    fn type_errors_name_key_line_and_column() {
        let text = "name = \"x\"\n\n[inner]\ncount = \"two\"\n";
        let src = Source::parse("job.toml", text).unwrap();
        let err = src.deserialize::<Doc>().unwrap_err();
        let p = &err.problems[0];
        assert_eq!(p.key.as_deref(), Some("inner.count"));
        assert_eq!((p.line, p.column), (Some(4), Some(9)));
        assert!(
            err.to_string()
                .starts_with("job.toml:4:9: inner.count: invalid type"),
            "{err}"
        );
    }

    /// A key given twice is named (the parser's message is only "duplicate key").
    #[test]
    fn duplicate_keys_are_named() {
        let err = Source::parse("t.toml", "name = \"x\"\nname = \"y\"\n")
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("t.toml:2:"), "{err}");
        assert!(err.contains("duplicate key `name`"), "{err}");
    }

    #[test]
    fn unknown_fields_are_named() {
        let text = "name = \"x\"\n[inner]\ncuont = 2\n";
        let err = Source::parse("f", text)
            .unwrap()
            .deserialize::<Doc>()
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("unknown field `cuont`; did you mean `count`?"),
            "{msg}"
        );
        assert!(msg.starts_with("f:3:1"), "{msg}");
    }

    #[test]
    fn unknown_names_get_the_closest_expected_one() {
        let expected = ", expected one of `num_train_epochs`, `max_steps`, `dtype`, \
                        `eval_strategy`, `save_steps`, `seed`";
        let fix = |m: &str| suggest(&format!("unknown field `{m}`{expected}"));
        assert_eq!(
            fix("num_epochs"),
            "unknown field `num_epochs`; did you mean `num_train_epochs`?"
        );
        assert_eq!(
            fix("max_step"),
            "unknown field `max_step`; did you mean `max_steps`?"
        );
        assert_eq!(
            fix("fp16"),
            "unknown field `fp16`; jobd spells it dtype = \"f16\""
        );
        assert_eq!(
            fix("evaluation_strategy"),
            "unknown field `evaluation_strategy`; did you mean `eval_strategy`?"
        );
        // Close to `eval_strategy`, but a name starting with another letter is not its
        // misspelling.
        assert!(!fix("save_strateg").contains("eval_strategy"));
        assert_eq!(
            fix("save_strategy"),
            "unknown field `save_strategy`; jobd saves a checkpoint every save_steps steps"
        );
        // Nothing close: serde's list stays.
        assert_eq!(fix("banana"), format!("unknown field `banana`{expected}"));
        // Where `dtype` is not expected, `bf16` is just unknown.
        assert_eq!(
            suggest("unknown field `bf16`, expected `name`"),
            "unknown field `bf16`, expected `name`"
        );
        assert_eq!(
            suggest("unknown variant `cosin`, expected one of `linear`, `cosine`"),
            "unknown variant `cosin`; did you mean `cosine`?"
        );
        assert_eq!(suggest("invalid type: string"), "invalid type: string");
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let err = Source::parse("f", "name = \n").err().unwrap();
        assert_eq!(err.problems[0].line, Some(1));
    }

    #[test]
    fn semantic_issues_are_located_by_key_path() {
        let text = "name = \"x\"\n[inner]\nlist = [\"a\", \"\"]\n";
        let src = Source::parse("f", text).unwrap();
        let err = src.locate(vec![Issue::new("inner.list[1]", "must not be empty")]);
        assert_eq!(err.to_string(), "f:3:14: inner.list[1]: must not be empty");
        let err = src.locate(vec![Issue::new("inner.missing", "is required")]);
        assert_eq!(
            err.problems[0].line,
            Some(2),
            "falls back to the parent table"
        );
    }
}
