//! `tokenizer.json` rebuilt from GGUF metadata.
//!
//! GGUF keeps the byte-level BPE vocabulary and merges plus the name of the
//! pre-tokenizer regex set (`tokenizer.ggml.pre`); the regexes themselves
//! live in llama.cpp code, so each supported name is mapped here to the
//! pipeline Hugging Face ships for that model family.

use crate::gguf::meta;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::Content;
use serde_json::{json, Value};
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// llama.cpp `token_type` for control tokens (`<|im_start|>` and friends).
const TOKEN_CONTROL: i64 = 3;
/// llama.cpp `token_type` for user-defined added tokens.
const TOKEN_USER_DEFINED: i64 = 4;

/// Llama 3 split regex (`llama-bpe` in llama.cpp).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2 split regex: like Llama 3 but single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Builds the tokenizer described by a GGUF's `tokenizer.ggml.*` metadata.
///
/// No BOS/EOS template is attached even when the GGUF asks for a BOS token:
/// BitStack's evaluation protocol encodes raw text.
pub fn tokenizer_from_gguf(content: &Content) -> Result<Tokenizer> {
    let model = meta::str_key(content, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        bail!("unsupported tokenizer model `{model}` (supported: gpt2, i.e. byte-level BPE)");
    }
    let pre = meta::opt_str(content, "tokenizer.ggml.pre")?.unwrap_or("default");
    if meta::opt_bool(content, "tokenizer.ggml.add_bos_token")? == Some(true) {
        tracing::debug!("GGUF asks for a BOS token; none is added (BitStack encodes raw text)");
    }
    let tokens = meta::opt_str_array(content, "tokenizer.ggml.tokens")?
        .context("missing GGUF metadata key `tokenizer.ggml.tokens`")?;
    let types = meta::opt_int_array(content, "tokenizer.ggml.token_type")?;
    if let Some(types) = &types {
        if types.len() != tokens.len() {
            bail!(
                "`tokenizer.ggml.token_type` has {} entries but `tokenizer.ggml.tokens` has {}",
                types.len(),
                tokens.len()
            );
        }
    }

    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        let id = u32::try_from(id).context("vocabulary larger than u32")?;
        // llama.cpp tolerates duplicates; a BPE vocab cannot. Keep the first.
        if vocab.contains_key(*token) {
            tracing::warn!("`tokenizer.ggml.tokens` repeats {token:?} at id {id}; ignoring it");
        } else {
            vocab.insert((*token).to_string(), id);
        }
    }
    let mut bpe = BPE::builder()
        .vocab_and_merges(vocab, merges(content)?)
        .ignore_merges(matches!(pre, "llama3" | "llama-bpe"));
    if let Some(unk) = meta::opt_u32(content, "tokenizer.ggml.unknown_token_id")? {
        let token = tokens
            .get(unk as usize)
            .with_context(|| format!("`tokenizer.ggml.unknown_token_id` {unk} is out of range"))?;
        bpe = bpe.unk_token((*token).to_string());
    }
    let bpe = bpe
        .build()
        .map_err(|e| anyhow!("building BPE model: {e}"))?;

    let mut tokenizer = Tokenizer::new(bpe);
    if pre == "qwen2" {
        tokenizer.with_normalizer(Some(NFC));
    }
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));

    if let Some(types) = &types {
        let added = |kind: i64, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(types)
                .filter(|(_, &t)| t == kind)
                .map(|(tok, _)| AddedToken::from(*tok, special))
                .collect()
        };
        tokenizer.add_special_tokens(&added(TOKEN_CONTROL, true));
        tokenizer.add_tokens(&added(TOKEN_USER_DEFINED, false));
    }
    Ok(tokenizer)
}

/// `tokenizer.ggml.merges`, each entry `"left right"`.
fn merges(content: &Content) -> Result<Vec<(String, String)>> {
    let key = "tokenizer.ggml.merges";
    let Some(merges) = meta::opt_str_array(content, key)? else {
        return Ok(Vec::new());
    };
    merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .with_context(|| format!("`{key}`[{i}] = {m:?} is not of the form `a b`"))
        })
        .collect()
}

/// The Hugging Face pre-tokenizer for llama.cpp's pre-tokenizer name.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow!("compiling the `{pre}` split regex: {e}"))?;
        Ok(split.into())
    };
    Ok(match pre {
        "smollm" => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        "default" | "gpt2" => ByteLevel::new(false, true, true).into(),
        "llama3" | "llama-bpe" => Sequence::new(vec![
            split(LLAMA3_REGEX)?,
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        "qwen2" => Sequence::new(vec![
            split(QWEN2_REGEX)?,
            ByteLevel::new(false, false, false).into(),
        ])
        .into(),
        other => bail!(
            "unsupported pre-tokenizer `{other}` in `tokenizer.ggml.pre` \
             (supported: smollm, gpt2, default, llama3, llama-bpe, qwen2)"
        ),
    })
}

/// A minimal `tokenizer_config.json` so `transformers` can load the folder.
pub(crate) fn tokenizer_config_json(content: &Content, max_len: usize) -> Result<Value> {
    let tokens = meta::opt_str_array(content, "tokenizer.ggml.tokens")?.unwrap_or_default();
    let token = |key: &str| -> Result<Option<String>> {
        let Some(id) = meta::opt_u32(content, key)? else {
            return Ok(None);
        };
        let token = tokens
            .get(id as usize)
            .with_context(|| format!("`{key}` {id} is out of range"))?;
        Ok(Some((*token).to_string()))
    };
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
        "model_max_length": max_len,
        "bos_token": token("tokenizer.ggml.bos_token_id")?,
        "eos_token": token("tokenizer.ggml.eos_token_id")?,
        "unk_token": token("tokenizer.ggml.unknown_token_id")?,
        "pad_token": token("tokenizer.ggml.padding_token_id")?,
        "add_bos_token": false,
    });
    if let Some(template) = meta::opt_str(content, "tokenizer.chat_template")? {
        config["chat_template"] = template.into();
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::{Value as G, VersionedMagic};
    use std::collections::HashMap;

    fn content(pre: &str, tokens: &[&str], merges: &[&str], types: &[i32]) -> Content {
        let strings = |xs: &[&str]| G::Array(xs.iter().map(|s| G::String(s.to_string())).collect());
        let metadata = HashMap::from([
            ("tokenizer.ggml.model".to_string(), G::String("gpt2".into())),
            ("tokenizer.ggml.pre".to_string(), G::String(pre.into())),
            ("tokenizer.ggml.tokens".to_string(), strings(tokens)),
            ("tokenizer.ggml.merges".to_string(), strings(merges)),
            (
                "tokenizer.ggml.token_type".to_string(),
                G::Array(types.iter().map(|&t| G::I32(t)).collect()),
            ),
        ]);
        Content {
            magic: VersionedMagic::GgufV3,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    #[test]
    fn tiny_bpe_with_specials() -> Result<()> {
        let c = content(
            "smollm",
            &["<s>", "a", "b", "ab", "Ġ", "Ġab", "1", "2"],
            &["a b", "Ġ ab"],
            &[3, 1, 1, 1, 1, 1, 1, 1],
        );
        let tok = tokenizer_from_gguf(&c)?;
        let enc = tok
            .encode("ab ab<s>12", false)
            .map_err(|e| anyhow!("{e}"))?;
        assert_eq!(enc.get_ids(), [3, 5, 0, 6, 7]);
        let text = tok
            .decode(enc.get_ids(), false)
            .map_err(|e| anyhow!("{e}"))?;
        assert_eq!(text, "ab ab<s>12");
        Ok(())
    }

    #[test]
    fn unsupported_pre_tokenizer_is_named() {
        let c = content("mystery", &["a"], &[], &[1]);
        let err = tokenizer_from_gguf(&c).unwrap_err().to_string();
        assert!(err.contains("mystery"), "{err}");
    }

    #[test]
    fn bad_merge_and_mismatched_types_are_errors() {
        let c = content("gpt2", &["a", "b"], &["ab"], &[1, 1]);
        let err = tokenizer_from_gguf(&c).unwrap_err().to_string();
        assert!(err.contains("tokenizer.ggml.merges"), "{err}");
        let c = content("gpt2", &["a", "b"], &[], &[1]);
        assert!(tokenizer_from_gguf(&c).is_err());
    }

    #[test]
    fn regex_pipelines_compile() -> Result<()> {
        for pre in ["llama3", "llama-bpe", "qwen2", "gpt2", "default"] {
            let c = content(pre, &["a", "b", "Ġ"], &[], &[1, 1, 1]);
            let tok = tokenizer_from_gguf(&c)?;
            let enc = tok.encode("ab a", false).map_err(|e| anyhow!("{e}"))?;
            assert_eq!(enc.get_ids(), [0, 1, 2, 0], "{pre}");
        }
        Ok(())
    }
}
