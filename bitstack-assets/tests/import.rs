//! Import of a small synthetic llama GGUF: exercises the full conversion
//! (names, shapes, q/k row order, config) and bad-input handling without
//! needing downloaded assets.

use anyhow::Result;
use bitstack_assets::gguf::{import_gguf, import_gguf_once, rope};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

const LAYERS: usize = 2;
const HIDDEN: usize = 8;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = HIDDEN / HEADS;
const INTER: usize = 12;

fn tokens() -> Vec<String> {
    let mut t = vec!["<|endoftext|>".to_string(), "<|im_start|>".to_string()];
    t.extend("abcdefghĠ".chars().map(String::from));
    t.push("ab".into());
    t
}

/// Deterministic, distinct values for the tensor named `name`.
fn weight(name: &str, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let seed = name.bytes().map(f32::from).sum::<f32>();
    let v: Vec<f32> = (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Hugging Face name -> value, and the GGUF that encodes them.
fn write_gguf(path: &Path, arch: &str, tied: bool) -> HashMap<String, Tensor> {
    let vocab = tokens().len();
    let mut hf = HashMap::new();
    let mut gg: Vec<(String, Tensor)> = Vec::new();
    let mut add = |g: String, h: String, shape: &[usize], heads: Option<usize>| {
        let w = weight(&h, shape);
        let stored = match heads {
            Some(heads) => rope::permute(&w, heads).unwrap(),
            None => w.clone(),
        };
        gg.push((g, stored));
        hf.insert(h, w);
    };
    add(
        "token_embd.weight".into(),
        "model.embed_tokens.weight".into(),
        &[vocab, HIDDEN],
        None,
    );
    add(
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        &[HIDDEN],
        None,
    );
    if !tied {
        add(
            "output.weight".into(),
            "lm_head.weight".into(),
            &[vocab, HIDDEN],
            None,
        );
    }
    let kv = KV_HEADS * HEAD_DIM;
    for i in 0..LAYERS {
        let parts: [(&str, &str, Vec<usize>, Option<usize>); 9] = [
            ("attn_norm", "input_layernorm", vec![HIDDEN], None),
            (
                "attn_q",
                "self_attn.q_proj",
                vec![HIDDEN, HIDDEN],
                Some(HEADS),
            ),
            (
                "attn_k",
                "self_attn.k_proj",
                vec![kv, HIDDEN],
                Some(KV_HEADS),
            ),
            ("attn_v", "self_attn.v_proj", vec![kv, HIDDEN], None),
            (
                "attn_output",
                "self_attn.o_proj",
                vec![HIDDEN, HIDDEN],
                None,
            ),
            ("ffn_norm", "post_attention_layernorm", vec![HIDDEN], None),
            ("ffn_gate", "mlp.gate_proj", vec![INTER, HIDDEN], None),
            ("ffn_up", "mlp.up_proj", vec![INTER, HIDDEN], None),
            ("ffn_down", "mlp.down_proj", vec![HIDDEN, INTER], None),
        ];
        for (g, h, shape, heads) in parts {
            add(
                format!("blk.{i}.{g}.weight"),
                format!("model.layers.{i}.{h}.weight"),
                &shape,
                heads,
            );
        }
    }

    let strings =
        |xs: &[String]| Value::Array(xs.iter().map(|s| Value::String(s.clone())).collect());
    let mut types = vec![Value::I32(1); vocab];
    types[0] = Value::I32(3);
    types[1] = Value::I32(3);
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String(arch.into())),
        ("llama.block_count", Value::U32(LAYERS as u32)),
        ("llama.context_length", Value::U32(64)),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Value::U32(INTER as u32)),
        ("llama.attention.head_count", Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.tokens", strings(&tokens())),
        ("tokenizer.ggml.merges", strings(&["a b".to_string()])),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(0)),
    ];
    let qts: Vec<(String, QTensor)> = gg
        .iter()
        .map(|(n, t)| (n.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap()))
        .collect();
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = qts.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
    hf
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn import_restores_names_shapes_and_row_order() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let gguf = dir.path().join("tiny.gguf");
    let expected = write_gguf(&gguf, "llama", true);
    let out = dir.path().join("hf");
    let report = import_gguf(&gguf, &out, DType::F32)?;
    assert_eq!(report.architecture, "llama");
    assert_eq!(report.tensors, expected.len());
    assert_eq!(report.out_dir, out);
    let params: usize = expected.values().map(|t| t.elem_count()).sum();
    assert_eq!(report.parameters, params);

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

    let config = read_json(&out.join("config.json"));
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["num_hidden_layers"], LAYERS);
    assert_eq!(config["num_key_value_heads"], KV_HEADS);
    assert_eq!(config["head_dim"], HEAD_DIM);
    assert_eq!(config["rope_theta"], 10000.0);
    assert_eq!(config["rms_norm_eps"], 1e-5);
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["bos_token_id"], 1);
    assert_eq!(config["torch_dtype"], "float32");
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let ids = tok.encode("<|im_start|>ab c", false).unwrap();
    assert_eq!(ids.get_ids(), [1, 11, 10, 4]);
    let tc = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(tc["bos_token"], "<|im_start|>");

    // Nothing but the output directory and the input remain.
    let mut names: Vec<_> = std::fs::read_dir(dir.path())?
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["hf", "tiny.gguf"]);
    Ok(())
}

#[test]
fn imports_into_one_dir_at_once_all_succeed_and_leave_one_model() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let gguf = dir.path().join("tiny.gguf");
    let expected = write_gguf(&gguf, "llama", true);
    let out = dir.path().join("hf");
    // Released together, so that several imports are under way at once
    // (plain `import_gguf` fails for all but the first to finish).
    let start = std::sync::Barrier::new(4);
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    import_gguf_once(&gguf, &out, DType::F32)
                })
            })
            .collect();
        for r in runs {
            r.join().unwrap().unwrap();
        }
    });
    let loaded = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)?;
    assert_eq!(loaded.len(), expected.len());
    // The losers' copies are gone; a later call finds the model and does nothing.
    let names = |d: &Path| -> Vec<String> {
        let mut n: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(dir.path()), ["hf", "tiny.gguf"]);
    let before = std::fs::metadata(out.join("model.safetensors"))?.modified()?;
    std::fs::remove_file(&gguf)?;
    import_gguf_once(&gguf, &out, DType::F32)?;
    assert_eq!(
        std::fs::metadata(out.join("model.safetensors"))?.modified()?,
        before
    );
    // A dir that holds something else is still an error.
    let other = dir.path().join("other");
    std::fs::create_dir(&other)?;
    std::fs::write(other.join("notes.txt"), "mine")?;
    write_gguf(&gguf, "llama", true);
    assert!(import_gguf_once(&gguf, &other, DType::F32).is_err());
    assert_eq!(std::fs::read_to_string(other.join("notes.txt"))?, "mine");
    Ok(())
}

#[test]
fn untied_bf16_import() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, "llama", false);
    let out = dir.path().join("hf");
    std::fs::create_dir(&out)?; // an empty directory may be replaced
    import_gguf(&gguf, &out, DType::BF16)?;
    let loaded = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)?;
    assert_eq!(loaded["lm_head.weight"].dtype(), DType::BF16);
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["tie_word_embeddings"], false);
    assert_eq!(config["torch_dtype"], "bfloat16");
    Ok(())
}

#[test]
fn unsupported_architecture_and_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, "gemma", true);
    let err = import_gguf(&gguf, &dir.path().join("a"), DType::F32).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("unsupported architecture gemma (supported: llama, qwen2)"),
        "{msg}"
    );
    let err = import_gguf(&gguf, &dir.path().join("b"), DType::U8).unwrap_err();
    assert!(
        format!("{err:#}").contains("unsupported output dtype"),
        "{err:#}"
    );
}

#[test]
fn missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("nope.gguf");
    let err = import_gguf(&gguf, &dir.path().join("out"), DType::F32).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("nope.gguf"), "{msg}");
    assert!(!dir.path().join("out").exists());
}

#[test]
fn existing_out_dir_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, "llama", true);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"mine").unwrap();
    let err = import_gguf(&gguf, &out, DType::F32).unwrap_err();
    assert!(format!("{err:#}").contains("exists"), "{err:#}");
    let names: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
    assert_eq!(names.len(), 1);
    assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"mine");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

/// Every truncation point gives an error naming the file, never a panic
/// and never a partial output directory.
#[test]
fn truncated_gguf_errors_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.gguf");
    write_gguf(&full, "llama", true);
    let bytes = std::fs::read(&full).unwrap();
    let cut = dir.path().join("cut.gguf");
    let out = dir.path().join("out");
    let step = (bytes.len() / 400).max(1);
    for len in (0..bytes.len()).step_by(step).chain([bytes.len() - 1]) {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let err = import_gguf(&cut, &out, DType::F32).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("cut.gguf"), "len {len}: {msg}");
        assert!(!out.exists(), "len {len}");
    }
}

/// Corrupting any single header byte must not panic or abort.
#[test]
fn corrupt_header_bytes_do_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.gguf");
    write_gguf(&full, "llama", true);
    let bytes = std::fs::read(&full).unwrap();
    let bad = dir.path().join("bad.gguf");
    let header_len = bytes.len().min(600);
    for pos in 0..header_len {
        for value in [0xff, 0x7f] {
            let mut b = bytes.clone();
            b[pos] = value;
            std::fs::write(&bad, &b).unwrap();
            let out = dir.path().join(format!("out-{pos}-{value}"));
            let _ = import_gguf(&bad, &out, DType::F32);
        }
    }
}
