//! Import of a small synthetic qwen2 GGUF with quantized tensors: names,
//! shapes, q/k/v biases, row order (no unpermute for qwen2), config and
//! tokenizer, and the errors for GGUFs the importer cannot take.

use anyhow::Result;
use bitstack_assets::gguf::import_gguf;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

const LAYERS: usize = 2;
const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
/// 256 so that `ffn_down` rows fit k-quant blocks.
const INTER: usize = 256;

fn tokens() -> Vec<String> {
    let mut t: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .into();
    t.extend("abc0124Ġ".chars().map(String::from));
    t.extend(["ab", "20", "[PAD13]"].map(String::from));
    t
}

fn weight(name: &str, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let seed = name.bytes().map(f32::from).sum::<f32>();
    let v: Vec<f32> = (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// One tensor of the file: GGUF name, HF name, stored type and the value
/// the import must produce (the dequantized stored tensor).
struct Entry {
    gguf: String,
    hf: String,
    q: QTensor,
    want: Tensor,
}

fn entry(gguf: String, hf: String, shape: &[usize], ty: GgmlDType) -> Entry {
    let q = QTensor::quantize(&weight(&hf, shape), ty).unwrap();
    let want = q.dequantize(&Device::Cpu).unwrap();
    Entry { gguf, hf, q, want }
}

fn entries() -> Vec<Entry> {
    let vocab = tokens().len();
    let kv = KV_HEADS * HEAD_DIM;
    let mut out = vec![
        entry(
            "token_embd.weight".into(),
            "model.embed_tokens.weight".into(),
            &[vocab, HIDDEN],
            GgmlDType::Q8_0,
        ),
        entry(
            "output_norm.weight".into(),
            "model.norm.weight".into(),
            &[HIDDEN],
            GgmlDType::F32,
        ),
        entry(
            "output.weight".into(),
            "lm_head.weight".into(),
            &[vocab, HIDDEN],
            GgmlDType::F16,
        ),
    ];
    for i in 0..LAYERS {
        let down = [GgmlDType::Q4K, GgmlDType::Q6K][i];
        let parts: [(&str, &str, Vec<usize>, GgmlDType); 12] = [
            (
                "attn_norm.weight",
                "input_layernorm.weight",
                vec![HIDDEN],
                GgmlDType::F32,
            ),
            (
                "attn_q.weight",
                "self_attn.q_proj.weight",
                vec![HIDDEN, HIDDEN],
                GgmlDType::Q8_0,
            ),
            (
                "attn_k.weight",
                "self_attn.k_proj.weight",
                vec![kv, HIDDEN],
                GgmlDType::Q5_0,
            ),
            (
                "attn_v.weight",
                "self_attn.v_proj.weight",
                vec![kv, HIDDEN],
                GgmlDType::Q8_0,
            ),
            (
                "attn_q.bias",
                "self_attn.q_proj.bias",
                vec![HIDDEN],
                GgmlDType::F32,
            ),
            (
                "attn_k.bias",
                "self_attn.k_proj.bias",
                vec![kv],
                GgmlDType::F32,
            ),
            (
                "attn_v.bias",
                "self_attn.v_proj.bias",
                vec![kv],
                GgmlDType::F32,
            ),
            (
                "attn_output.weight",
                "self_attn.o_proj.weight",
                vec![HIDDEN, HIDDEN],
                GgmlDType::Q5_0,
            ),
            (
                "ffn_norm.weight",
                "post_attention_layernorm.weight",
                vec![HIDDEN],
                GgmlDType::F32,
            ),
            (
                "ffn_gate.weight",
                "mlp.gate_proj.weight",
                vec![INTER, HIDDEN],
                GgmlDType::Q5_0,
            ),
            (
                "ffn_up.weight",
                "mlp.up_proj.weight",
                vec![INTER, HIDDEN],
                GgmlDType::Q8_0,
            ),
            (
                "ffn_down.weight",
                "mlp.down_proj.weight",
                vec![HIDDEN, INTER],
                down,
            ),
        ];
        for (g, h, shape, ty) in parts {
            out.push(entry(
                format!("blk.{i}.{g}"),
                format!("model.layers.{i}.{h}"),
                &shape,
                ty,
            ));
        }
    }
    out
}

/// Writes the GGUF; returns HF name → expected tensor.
fn write_gguf(path: &Path, arch: &str) -> HashMap<String, Tensor> {
    write_gguf_without(path, arch, "")
}

/// As [`write_gguf`], leaving out the tensor named `skip`.
fn write_gguf_without(path: &Path, arch: &str, skip: &str) -> HashMap<String, Tensor> {
    let entries: Vec<Entry> = entries().into_iter().filter(|e| e.gguf != skip).collect();
    let strings =
        |xs: &[String]| Value::Array(xs.iter().map(|s| Value::String(s.clone())).collect());
    let vocab = tokens().len();
    let mut types = vec![Value::I32(1); vocab];
    for t in &mut types[..3] {
        *t = Value::I32(3); // control
    }
    types[vocab - 1] = Value::I32(5); // unused padding
    let key = |k: &str| format!("{arch}.{k}");
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (key("block_count"), Value::U32(LAYERS as u32)),
        (key("context_length"), Value::U32(128)),
        (key("embedding_length"), Value::U32(HIDDEN as u32)),
        (key("feed_forward_length"), Value::U32(INTER as u32)),
        (key("attention.head_count"), Value::U32(HEADS as u32)),
        (key("attention.head_count_kv"), Value::U32(KV_HEADS as u32)),
        (key("rope.freq_base"), Value::F32(1e6)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("qwen2".into())),
        ("tokenizer.ggml.tokens".into(), strings(&tokens())),
        (
            "tokenizer.ggml.merges".into(),
            strings(&["a b".to_string(), "2 0".to_string()]),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ];
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        entries.iter().map(|e| (e.gguf.as_str(), &e.q)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
    entries.into_iter().map(|e| (e.hf, e.want)).collect()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn qwen2_import_keeps_values_biases_and_row_order() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let gguf = dir.path().join("tiny-qwen2.gguf");
    let expected = write_gguf(&gguf, "qwen2");
    let out = dir.path().join("hf");
    let report = import_gguf(&gguf, &out, DType::F32)?;
    assert_eq!(report.architecture, "qwen2");
    assert_eq!(report.tensors, 3 + LAYERS * 12);
    assert_eq!(report.tensors, expected.len());

    // Exactly the dequantized GGUF values: q/k rows are not permuted.
    let loaded = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)?;
    assert_eq!(loaded.len(), expected.len());
    for (name, want) in &expected {
        let got = loaded.get(name).unwrap_or_else(|| panic!("missing {name}"));
        assert_eq!(got.dims(), want.dims(), "{name}");
        let diff = (got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "{name}");
    }
    assert_eq!(loaded["model.layers.1.self_attn.k_proj.bias"].dims(), [32]);

    let config = read_json(&out.join("config.json"));
    assert_eq!(config["architectures"][0], "Qwen2ForCausalLM");
    assert_eq!(config["model_type"], "qwen2");
    assert_eq!(config["num_hidden_layers"], LAYERS);
    assert_eq!(config["num_attention_heads"], HEADS);
    assert_eq!(config["num_key_value_heads"], KV_HEADS);
    assert_eq!(config["intermediate_size"], INTER);
    assert_eq!(config["rope_theta"], 1e6);
    assert_eq!(config["rms_norm_eps"], 1e-6);
    assert_eq!(config["tie_word_embeddings"], false);
    assert_eq!(config["use_sliding_window"], false);
    assert_eq!(config["vocab_size"], tokens().len());
    assert_eq!(config["eos_token_id"], 2);
    // Llama-only keys stay out of a Qwen2 config.
    assert!(config.get("attention_bias").is_none());

    // qwen2 pre-tokenizer: digits one by one (the "2 0" merge never
    // applies), control tokens whole.
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let ids = tok.encode("<|im_start|>ab 2024<|im_end|>", false).unwrap();
    assert_eq!(ids.get_ids(), [1, 11, 10, 8, 6, 8, 9, 2]);
    Ok(())
}

#[test]
fn unknown_architecture_is_named_with_the_supported() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, "gemma2");
    let out = dir.path().join("out");
    let msg = format!("{:#}", import_gguf(&gguf, &out, DType::F32).unwrap_err());
    assert!(msg.contains("tiny.gguf"), "{msg}");
    assert!(
        msg.contains("unsupported architecture gemma2 (supported: llama, qwen2)"),
        "{msg}"
    );
    assert!(!out.exists());
}

/// Rewrites the GGML type of tensor `name` in the GGUF header.
fn set_tensor_type(path: &Path, name: &str, ty: u32) {
    let mut bytes = std::fs::read(path).unwrap();
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("tensor info");
    // name, n_dims (u32), dims (u64 each), type (u32)
    let dims_at = at + needle.len();
    let n_dims = u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().unwrap()) as usize;
    let ty_at = dims_at + 4 + 8 * n_dims;
    bytes[ty_at..ty_at + 4].copy_from_slice(&ty.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn unsupported_tensor_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    let out = dir.path().join("out");
    // IQ2_XXS: candle cannot read it; Q8_1: candle reads but cannot dequantize it.
    for (ty, name) in [(16, "IQ2_XXS (16)"), (9, "Q8_1 (9)")] {
        write_gguf(&gguf, "qwen2");
        set_tensor_type(&gguf, "blk.1.ffn_up.weight", ty);
        let msg = format!("{:#}", import_gguf(&gguf, &out, DType::F32).unwrap_err());
        assert!(msg.contains("tiny.gguf"), "{msg}");
        assert!(
            msg.contains(&format!(
                "tensor blk.1.ffn_up.weight has GGML type {name}, which the importer does not handle"
            )),
            "{msg}"
        );
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

#[test]
fn missing_bias_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf_without(&gguf, "qwen2", "blk.0.attn_k.bias");
    let out = dir.path().join("out");
    let msg = format!("{:#}", import_gguf(&gguf, &out, DType::F32).unwrap_err());
    assert!(msg.contains("tiny.gguf"), "{msg}");
    assert!(msg.contains("missing tensor blk.0.attn_k.bias"), "{msg}");
    assert!(!out.exists());
}
