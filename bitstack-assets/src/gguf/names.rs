//! GGUF tensor names to Hugging Face Llama/Qwen2 names, with the expected shapes.

use super::llama::LlamaParams;

/// What a q/k tensor needs besides renaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fix {
    None,
    /// Undo llama.cpp's RoPE row interleave with this many heads.
    Unpermute(usize),
}

/// One tensor to import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mapping {
    pub gguf: String,
    pub hf: String,
    /// `[out, in]` for matrices, `[n]` for norms.
    pub shape: Vec<usize>,
    pub fix: Fix,
}

fn map(gguf: String, hf: String, shape: Vec<usize>, fix: Fix) -> Mapping {
    Mapping {
        gguf,
        hf,
        shape,
        fix,
    }
}

/// Every tensor a llama or qwen2 GGUF must contain (plus `output.weight`
/// unless the embeddings are tied, and qwen2's q/k/v biases), in
/// file-independent order.
pub(crate) fn llama_tensors(p: &LlamaParams, tied: bool) -> Vec<Mapping> {
    let (h, v, f) = (p.hidden, p.vocab_size, p.intermediate);
    let (q, kv) = (p.heads * p.head_dim, p.kv_heads * p.head_dim);
    let unpermute = |heads| {
        if p.arch.permutes_qk() {
            Fix::Unpermute(heads)
        } else {
            Fix::None
        }
    };
    let mut out = vec![
        map(
            "token_embd.weight".into(),
            "model.embed_tokens.weight".into(),
            vec![v, h],
            Fix::None,
        ),
        map(
            "output_norm.weight".into(),
            "model.norm.weight".into(),
            vec![h],
            Fix::None,
        ),
    ];
    if !tied {
        out.push(map(
            "output.weight".into(),
            "lm_head.weight".into(),
            vec![v, h],
            Fix::None,
        ));
    }
    for i in 0..p.block_count {
        let layer = |g: &str, hf: &str, shape: Vec<usize>, fix: Fix| {
            map(
                format!("blk.{i}.{g}.weight"),
                format!("model.layers.{i}.{hf}.weight"),
                shape,
                fix,
            )
        };
        out.extend([
            layer("attn_norm", "input_layernorm", vec![h], Fix::None),
            layer("attn_q", "self_attn.q_proj", vec![q, h], unpermute(p.heads)),
            layer(
                "attn_k",
                "self_attn.k_proj",
                vec![kv, h],
                unpermute(p.kv_heads),
            ),
            layer("attn_v", "self_attn.v_proj", vec![kv, h], Fix::None),
            layer("attn_output", "self_attn.o_proj", vec![h, q], Fix::None),
            layer("ffn_norm", "post_attention_layernorm", vec![h], Fix::None),
            layer("ffn_gate", "mlp.gate_proj", vec![f, h], Fix::None),
            layer("ffn_up", "mlp.up_proj", vec![f, h], Fix::None),
            layer("ffn_down", "mlp.down_proj", vec![h, f], Fix::None),
        ]);
        if p.arch.qkv_bias() {
            for (g, hf, n) in [
                ("attn_q", "self_attn.q_proj", q),
                ("attn_k", "self_attn.k_proj", kv),
                ("attn_v", "self_attn.v_proj", kv),
            ] {
                out.push(map(
                    format!("blk.{i}.{g}.bias"),
                    format!("model.layers.{i}.{hf}.bias"),
                    vec![n],
                    Fix::None,
                ));
            }
        }
    }
    out
}
