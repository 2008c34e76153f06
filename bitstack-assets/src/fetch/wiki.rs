//! Evaluation / calibration split of the Wikipedia summaries.
//!
//! The recipe matches the reference Python: entries sorted by title (code
//! point order), `extract` stripped as `str.strip()` does, every tenth entry
//! to evaluation, the rest to calibration, joined by blank lines.

use anyhow::{bail, Context, Result};

/// The two derived texts.
#[derive(Debug)]
pub(crate) struct Texts {
    pub eval: String,
    pub calib: String,
}

/// Splits the summaries JSON (`source` names it in errors).
pub(crate) fn split(json: &[u8], source: &str) -> Result<Texts> {
    let value: serde_json::Value =
        serde_json::from_slice(json).with_context(|| format!("parsing JSON {source}"))?;
    let Some(map) = value.as_object() else {
        bail!("{source}: expected a JSON object at the top level");
    };
    // Sort explicitly: serde_json's map order depends on crate features.
    // UTF-8 byte order equals code point order, which is Python's str order.
    let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let (mut eval, mut calib) = (Vec::new(), Vec::new());
    for (i, (key, entry)) in entries.into_iter().enumerate() {
        let Some(extract) = entry.get("extract").and_then(|e| e.as_str()) else {
            bail!("{source}: entry {key:?} has no string \"extract\"");
        };
        let text = py_strip(extract);
        if i % 10 == 0 {
            eval.push(text);
        } else {
            calib.push(text);
        }
    }
    Ok(Texts {
        eval: eval.join("\n\n"),
        calib: calib.join("\n\n"),
    })
}

/// Python's `str.isspace()`: Rust's White_Space plus the information
/// separators U+001C..U+001F, which Python counts as whitespace.
fn py_is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()` with no arguments.
fn py_strip(s: &str) -> &str {
    s.trim_matches(py_is_space)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_matches_python() {
        assert_eq!(py_strip("\u{1f}\u{a0} a b\u{3000}\n\u{1c}"), "a b");
        // Zero-width space is not whitespace in Python either.
        assert_eq!(py_strip("\u{200b}x"), "\u{200b}x");
    }

    #[test]
    fn split_sorts_by_code_point() {
        let mut obj = serde_json::Map::new();
        for i in 0..12 {
            let key = format!("k{i:02}");
            obj.insert(
                key.clone(),
                serde_json::json!({ "extract": format!(" {key} ") }),
            );
        }
        obj.insert("Z".into(), serde_json::json!({ "extract": "zz" }));
        obj.insert("é".into(), serde_json::json!({ "extract": "ee" }));
        let json = serde_json::to_vec(&obj).unwrap();
        let texts = split(&json, "test.json").unwrap();
        // Order: Z, k00..k11, é ; indices 0 and 10 go to eval.
        assert_eq!(texts.eval, "zz\n\nk09");
        assert!(texts.calib.starts_with("k00\n\nk01"));
        assert!(texts.calib.ends_with("k10\n\nk11\n\nee"));
    }

    #[test]
    fn bad_entry_names_key() {
        let err = split(br#"{"a": {"extract": 3}}"#, "s.json").unwrap_err();
        assert!(err.to_string().contains("\"a\""), "{err}");
        assert!(split(b"[1]", "s.json").is_err());
        assert!(split(b"{", "s.json")
            .unwrap_err()
            .to_string()
            .contains("s.json"));
    }
}
