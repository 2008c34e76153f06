//! Checks against the real SmolLM2-135M GGUF and wiki texts, fetched (with
//! pip, once) into `default_assets_dir()` (`$BITSTACK_HOME`). `#[ignore]`d in
//! the offline fast suite; CI runs them with `--include-ignored`.

use anyhow::{anyhow, Result};
use bitstack_assets::gguf::read_gguf;
use bitstack_assets::tokenizer::tokenizer_from_gguf;
use bitstack_assets::{fetch_assets, import_gguf};
use candle_core::{DType, Device};
use std::path::PathBuf;

const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Path of an asset, fetching the assets on first use.
fn asset(name: &str) -> PathBuf {
    static FETCHED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = FETCHED.get_or_init(|| fetch_assets(None).expect("fetch-assets").dir);
    dir.join(name)
}

fn tokenizer() -> Result<tokenizers::Tokenizer> {
    let path = asset(GGUF);
    let (content, _) = read_gguf(&path)?;
    tokenizer_from_gguf(&content)
}

fn encode(tok: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tok.encode(text, false).map_err(|e| anyhow!("{e}"))?;
    Ok(enc.get_ids().to_vec())
}

#[test]
#[ignore = "needs the SmolLM2 assets (fetched with pip)"]
fn tokenizer_matches_hugging_face_ids() -> Result<()> {
    let tok = tokenizer()?;
    assert_eq!(
        encode(&tok, "Hello world, 2024 is here!")?,
        [19556, 905, 28, 216, 34, 32, 34, 36, 314, 1535, 17]
    );
    assert_eq!(
        encode(&tok, "The capital of France is")?,
        [504, 3575, 282, 4649, 314]
    );
    assert_eq!(encode(&tok, "<|im_start|>")?, [1]);
    assert_eq!(tok.get_vocab_size(true), 49152);
    Ok(())
}

#[test]
#[ignore = "needs the SmolLM2 assets (fetched with pip)"]
fn tokenizer_round_trips() -> Result<()> {
    let tok = tokenizer()?;
    let text = "Plain ASCII, tabs\tand  spaces.\nZürich — 東京 🚀 naïve café 12345";
    let ids = encode(&tok, text)?;
    let back = tok.decode(&ids, false).map_err(|e| anyhow!("{e}"))?;
    assert_eq!(back, text);
    let chat = "<|im_start|>user\nHi<|im_end|>";
    let ids = encode(&tok, chat)?;
    assert_eq!(ids[0], 1);
    assert_eq!(*ids.last().unwrap(), 2);
    assert_eq!(tok.decode(&ids, false).map_err(|e| anyhow!("{e}"))?, chat);
    Ok(())
}

#[test]
#[ignore = "needs the SmolLM2 assets (fetched with pip)"]
fn eval_text_token_count() -> Result<()> {
    let tok = tokenizer()?;
    let path = asset("wiki-eval.txt");
    let text = std::fs::read_to_string(path)?;
    let ids = encode(&tok, &text)?;
    assert_eq!(ids.len(), 107_872);
    assert_eq!(ids[..8], [32, 314, 253, 1230, 7834, 354, 7964, 9044]);
    Ok(())
}

#[test]
#[ignore = "needs the SmolLM2 assets (fetched with pip)"]
fn import_smollm2() -> Result<()> {
    let gguf = asset(GGUF);
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("smollm2");
    let report = import_gguf(&gguf, &out, DType::F16)?;
    assert_eq!(report.architecture, "llama");
    assert_eq!(report.tensors, 2 + 30 * 9);
    assert_eq!(report.parameters, 134_515_008);

    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json"))?)?;
    for (key, want) in [
        ("num_hidden_layers", 30),
        ("hidden_size", 576),
        ("num_attention_heads", 9),
        ("num_key_value_heads", 3),
        ("intermediate_size", 1536),
        ("vocab_size", 49152),
        ("head_dim", 64),
        ("max_position_embeddings", 8192),
        ("bos_token_id", 1),
        ("eos_token_id", 2),
    ] {
        assert_eq!(config[key], want, "{key}");
    }
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["rope_theta"], 100000.0);
    assert_eq!(config["rms_norm_eps"], 1e-5);
    assert_eq!(config["torch_dtype"], "float16");

    let tensors = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)?;
    assert_eq!(tensors.len(), report.tensors);
    assert!(!tensors.contains_key("lm_head.weight"));
    let mut expected = vec![
        ("model.embed_tokens.weight".to_string(), vec![49152, 576]),
        ("model.norm.weight".to_string(), vec![576]),
    ];
    for i in 0..30 {
        let l = format!("model.layers.{i}");
        expected.extend([
            (format!("{l}.input_layernorm.weight"), vec![576]),
            (format!("{l}.post_attention_layernorm.weight"), vec![576]),
            (format!("{l}.self_attn.q_proj.weight"), vec![576, 576]),
            (format!("{l}.self_attn.k_proj.weight"), vec![192, 576]),
            (format!("{l}.self_attn.v_proj.weight"), vec![192, 576]),
            (format!("{l}.self_attn.o_proj.weight"), vec![576, 576]),
            (format!("{l}.mlp.gate_proj.weight"), vec![1536, 576]),
            (format!("{l}.mlp.up_proj.weight"), vec![1536, 576]),
            (format!("{l}.mlp.down_proj.weight"), vec![576, 1536]),
        ]);
    }
    for (name, shape) in &expected {
        let t = tensors.get(name).ok_or_else(|| anyhow!("missing {name}"))?;
        assert_eq!(t.dims(), shape.as_slice(), "{name}");
        assert_eq!(t.dtype(), DType::F16, "{name}");
    }
    let tok =
        tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).map_err(|e| anyhow!("{e}"))?;
    assert_eq!(
        encode(&tok, "The capital of France is")?,
        [504, 3575, 282, 4649, 314]
    );
    Ok(())
}

#[test]
#[ignore = "needs the SmolLM2 assets (fetched with pip)"]
fn truncated_real_gguf_names_file() -> Result<()> {
    let gguf = asset(GGUF);
    let dir = tempfile::tempdir()?;
    let cut = dir.path().join("cut.gguf");
    let bytes = std::fs::read(&gguf)?;
    for len in [100, 2_000_000, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&cut, &bytes[..len])?;
        let err = import_gguf(&cut, &dir.path().join("out"), DType::F32).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("cut.gguf"), "{msg}");
        assert!(!dir.path().join("out").exists());
    }
    Ok(())
}
