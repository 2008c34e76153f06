//! The linears of a Llama-family decoder layer: their names, shapes and
//! inputs. Everything that walks a model's linears (the format, the
//! runner, calibration) takes them from here.

use crate::format::config::ModelConfig;

/// The seven linears of a decoder layer, in the order the reference names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LinearKind {
    pub const ALL: [LinearKind; 7] = [
        LinearKind::Q,
        LinearKind::K,
        LinearKind::V,
        LinearKind::O,
        LinearKind::Gate,
        LinearKind::Up,
        LinearKind::Down,
    ];

    /// Name inside a layer, e.g. `self_attn.q_proj`.
    pub fn name(self) -> &'static str {
        match self {
            LinearKind::Q => "self_attn.q_proj",
            LinearKind::K => "self_attn.k_proj",
            LinearKind::V => "self_attn.v_proj",
            LinearKind::O => "self_attn.o_proj",
            LinearKind::Gate => "mlp.gate_proj",
            LinearKind::Up => "mlp.up_proj",
            LinearKind::Down => "mlp.down_proj",
        }
    }

    /// The short module name, e.g. `q_proj`.
    pub fn short_name(self) -> &'static str {
        self.name().rsplit('.').next().expect("names have a dot")
    }

    /// Parses a short module name (`q_proj`, …).
    pub fn from_short_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.short_name() == name)
    }

    /// Full tensor prefix, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn path(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.name())
    }

    /// Where this linear's input comes from.
    pub fn input(self) -> TapPoint {
        match self {
            LinearKind::Q | LinearKind::K | LinearKind::V => TapPoint::AttnInput,
            LinearKind::O => TapPoint::OInput,
            LinearKind::Gate | LinearKind::Up => TapPoint::MlpInput,
            LinearKind::Down => TapPoint::DownInput,
        }
    }
}

/// The four distinct linear inputs of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TapPoint {
    /// `input_layernorm(x)`, read by q, k, v.
    AttnInput,
    /// The attention mix, read by o.
    OInput,
    /// `post_attention_layernorm(x)`, read by gate, up.
    MlpInput,
    /// `silu(gate)·up`, read by down.
    DownInput,
}

/// `(out, in)` of a decoder linear.
pub fn linear_shape(cfg: &ModelConfig, kind: LinearKind) -> (usize, usize) {
    checked_linear_shape(cfg, kind)
        .expect("ModelConfig::validate checks that every linear's size can be counted")
}

/// [`linear_shape`], `None` when a size overflows: what config validation
/// checks before anything multiplies shapes out.
pub fn checked_linear_shape(cfg: &ModelConfig, kind: LinearKind) -> Option<(usize, usize)> {
    let (d, hd) = (cfg.hidden_size, cfg.head_dim());
    let (q, kv, ff) = (
        cfg.num_attention_heads.checked_mul(hd)?,
        cfg.kv_heads().checked_mul(hd)?,
        cfg.intermediate_size,
    );
    Some(match kind {
        LinearKind::Q => (q, d),
        LinearKind::K | LinearKind::V => (kv, d),
        LinearKind::O => (d, q),
        LinearKind::Gate | LinearKind::Up => (ff, d),
        LinearKind::Down => (d, ff),
    })
}

pub fn linear_weight_count(cfg: &ModelConfig) -> usize {
    let per_layer: usize = LinearKind::ALL
        .iter()
        .map(|&k| {
            let (m, n) = linear_shape(cfg, k);
            m * n
        })
        .sum();
    per_layer * cfg.num_hidden_layers
}

/// The linear's bias, if the architecture gives it one.
pub fn has_bias(cfg: &ModelConfig, kind: LinearKind) -> bool {
    match kind {
        LinearKind::Q | LinearKind::K | LinearKind::V => cfg.qkv_bias(),
        LinearKind::O => cfg.o_bias(),
        _ => false,
    }
}

/// Every tensor the runner holds besides the decoder linears' weights —
/// embeddings, norms, biases, an untied lm_head — with its element count.
/// The one list the memory ladder and the runner agree on.
pub fn dense_tensors(cfg: &ModelConfig) -> Vec<(String, usize)> {
    let d = cfg.hidden_size;
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), cfg.vocab_size * d),
        ("model.norm.weight".to_string(), d),
    ];
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), cfg.vocab_size * d));
    }
    for l in 0..cfg.num_hidden_layers {
        out.push((format!("model.layers.{l}.input_layernorm.weight"), d));
        out.push((
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            d,
        ));
        for kind in LinearKind::ALL {
            if has_bias(cfg, kind) {
                out.push((format!("{}.bias", kind.path(l)), linear_shape(cfg, kind).0));
            }
        }
    }
    out
}
