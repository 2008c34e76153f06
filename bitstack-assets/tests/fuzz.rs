//! GGUF headers, fuzzed: a small llama GGUF written here byte by byte
//! (v3, and v1 with its 32-bit lengths), with every length field it holds
//! (tensor and metadata counts, string and array lengths, ranks,
//! dimensions, offsets) and its types and numeric values set to random and
//! extreme values, plus byte flips, truncation and version swaps. Each case
//! goes through `read_gguf`, reads and dequantizes every tensor it lists,
//! and runs the whole import: `Ok` or an error naming the file, never a
//! panic, a hang or an allocation far beyond the file's size.
//!
//! See `tests/fuzz_harness` at the workspace root for the seeds, the case
//! counts, the allocation bound and how to replay a case;
//! `scripts/fuzz.sh SECONDS` runs long.

#[path = "../../tests/fuzz_harness/mod.rs"]
mod fuzz_harness;

use std::path::Path;

use bitstack_assets::gguf::{import_gguf, read_gguf};
use candle_core::{DType, Device};
use fuzz_harness::{flip_bytes, nasty_u64, pick, CASE_BOUND};
use rand::rngs::StdRng;
use rand::Rng;

/// A field of the header: where it is, how wide, and what it is.
#[derive(Clone, Copy, Debug)]
struct Field {
    at: usize,
    width: usize,
    what: &'static str,
}

/// GGUF metadata values (the subset the file below uses).
enum Meta {
    U32(u32),
    I32(i32),
    F32(f32),
    Str(&'static str),
    Strs(Vec<&'static str>),
    I32s(Vec<i32>),
}

/// A GGUF written byte by byte, remembering every field.
struct Writer {
    bytes: Vec<u8>,
    v1: bool,
    fields: Vec<Field>,
}

impl Writer {
    fn field(&mut self, value: &[u8], what: &'static str) {
        self.fields.push(Field {
            at: self.bytes.len(),
            width: value.len(),
            what,
        });
        self.bytes.extend_from_slice(value);
    }

    fn u32(&mut self, v: u32, what: &'static str) {
        self.field(&v.to_le_bytes(), what);
    }

    /// A length or count: u32 in v1, u64 later.
    fn count(&mut self, n: usize, what: &'static str) {
        if self.v1 {
            self.field(&(n as u32).to_le_bytes(), what);
        } else {
            self.field(&(n as u64).to_le_bytes(), what);
        }
    }

    fn string(&mut self, s: &str, what: &'static str) {
        self.count(s.len(), what);
        self.bytes.extend_from_slice(s.as_bytes());
    }

    fn meta(&mut self, key: &str, value: &Meta) {
        self.string(key, "key length");
        match value {
            Meta::U32(v) => {
                self.u32(4, "value type");
                self.field(&v.to_le_bytes(), "u32 value");
            }
            Meta::I32(v) => {
                self.u32(5, "value type");
                self.field(&v.to_le_bytes(), "i32 value");
            }
            Meta::F32(v) => {
                self.u32(6, "value type");
                self.field(&v.to_le_bytes(), "f32 value");
            }
            Meta::Str(s) => {
                self.u32(8, "value type");
                self.string(s, "string length");
            }
            Meta::Strs(items) => {
                self.u32(9, "value type");
                self.u32(8, "array type");
                self.count(items.len(), "array length");
                for s in items {
                    self.string(s, "array string length");
                }
            }
            Meta::I32s(items) => {
                self.u32(9, "value type");
                self.u32(5, "array type");
                self.count(items.len(), "array length");
                for v in items {
                    self.field(&v.to_le_bytes(), "array i32");
                }
            }
        }
    }
}

const HIDDEN: usize = 8;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const INTER: usize = 12;
const ALIGN: usize = 32;

fn tokens() -> Vec<&'static str> {
    vec![
        "<|endoftext|>",
        "<|im_start|>",
        "a",
        "b",
        "c",
        "d",
        "e",
        "f",
        "g",
        "h",
        "Ġ",
        "ab",
    ]
}

/// A valid one-layer llama GGUF (tied embeddings; one tensor in F16, the
/// others F32) and its fields.
fn gguf(v1: bool) -> (Vec<u8>, Vec<Field>) {
    let vocab = tokens().len();
    let kv = KV_HEADS * (HIDDEN / HEADS);
    // (name, Hugging Face shape, ggml type)
    let tensors: Vec<(&str, Vec<usize>, u32)> = vec![
        ("token_embd.weight", vec![vocab, HIDDEN], 0),
        ("output_norm.weight", vec![HIDDEN], 0),
        ("blk.0.attn_norm.weight", vec![HIDDEN], 0),
        ("blk.0.attn_q.weight", vec![HIDDEN, HIDDEN], 0),
        ("blk.0.attn_k.weight", vec![kv, HIDDEN], 0),
        ("blk.0.attn_v.weight", vec![kv, HIDDEN], 0),
        ("blk.0.attn_output.weight", vec![HIDDEN, HIDDEN], 0),
        ("blk.0.ffn_norm.weight", vec![HIDDEN], 0),
        ("blk.0.ffn_gate.weight", vec![INTER, HIDDEN], 0),
        ("blk.0.ffn_up.weight", vec![INTER, HIDDEN], 1),
        ("blk.0.ffn_down.weight", vec![HIDDEN, INTER], 0),
    ];
    let mut types = vec![1; vocab];
    types[0] = 3;
    types[1] = 3;
    let metadata: Vec<(&str, Meta)> = vec![
        ("general.architecture", Meta::Str("llama")),
        ("general.alignment", Meta::U32(ALIGN as u32)),
        ("llama.block_count", Meta::U32(1)),
        ("llama.context_length", Meta::U32(64)),
        ("llama.embedding_length", Meta::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Meta::U32(INTER as u32)),
        ("llama.attention.head_count", Meta::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Meta::I32(KV_HEADS as i32)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("llama.rope.freq_base", Meta::F32(10000.0)),
        ("tokenizer.ggml.model", Meta::Str("gpt2")),
        ("tokenizer.ggml.pre", Meta::Str("smollm")),
        ("tokenizer.ggml.tokens", Meta::Strs(tokens())),
        ("tokenizer.ggml.merges", Meta::Strs(vec!["a b"])),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ("tokenizer.ggml.bos_token_id", Meta::U32(1)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(0)),
    ];
    let mut w = Writer {
        bytes: Vec::new(),
        v1,
        fields: Vec::new(),
    };
    w.field(b"GGUF", "magic");
    w.u32(if v1 { 1 } else { 3 }, "version");
    w.count(tensors.len(), "tensor count");
    w.count(metadata.len(), "metadata count");
    for (key, value) in &metadata {
        w.meta(key, value);
    }
    // Tensor data: each tensor aligned, values from its name and index.
    let mut data = Vec::new();
    for (name, shape, ty) in &tensors {
        w.string(name, "tensor name length");
        w.u32(shape.len() as u32, "rank");
        // ggml lists dimensions innermost first.
        for &d in shape.iter().rev() {
            w.count(d, "dimension");
        }
        w.u32(*ty, "ggml type");
        while !data.len().is_multiple_of(ALIGN) {
            data.push(0);
        }
        w.field(&(data.len() as u64).to_le_bytes(), "tensor offset");
        let count: usize = shape.iter().product();
        let seed = name.len() as f32;
        for i in 0..count {
            let v = ((i as f32 + seed) * 0.37).sin();
            match ty {
                1 => data.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                _ => data.extend_from_slice(&v.to_le_bytes()),
            }
        }
    }
    while !w.bytes.len().is_multiple_of(ALIGN) {
        w.bytes.push(0);
    }
    w.bytes.extend_from_slice(&data);
    (w.bytes, w.fields)
}

/// A value for a field of `width` bytes that held `was`: random and extreme.
fn field_value(rng: &mut StdRng, width: usize, was: u64) -> Vec<u8> {
    let v = nasty_u64(rng, was);
    if width == 4 {
        let v = match rng.random_range(0..4) {
            0 => u32::MAX - rng.random_range(0..3),
            1 => i32::MAX as u32 + rng.random_range(0..2),
            _ => v as u32,
        };
        v.to_le_bytes().to_vec()
    } else {
        v.to_le_bytes()[..width].to_vec()
    }
}

/// One mutation of the file; returns what it did.
fn mutate(rng: &mut StdRng, bytes: &mut Vec<u8>, fields: &[Field]) -> String {
    let len = bytes.len();
    let header_end = fields.last().map_or(len, |f| f.at + f.width).min(len);
    // After a cut, the fields still in the file (their offsets are those of
    // the file as written: after an insertion they point elsewhere, which
    // is fine).
    let fields: Vec<Field> = fields
        .iter()
        .filter(|f| f.at + f.width <= len)
        .copied()
        .collect();
    if fields.is_empty() {
        flip_bytes(rng, bytes, 0..len);
        return "flip anywhere".into();
    }
    let fields = fields.as_slice();
    match rng.random_range(0..12) {
        // A length, count, dimension, offset, type or value; half the
        // time one that leaves the header readable (a metadata value, a
        // dimension, a tensor's type or offset), to reach the import.
        0..=5 => {
            let deep: Vec<Field> = fields
                .iter()
                .filter(|f| {
                    f.what.ends_with(" value")
                        || matches!(
                            f.what,
                            "array i32" | "dimension" | "ggml type" | "tensor offset"
                        )
                })
                .copied()
                .collect();
            let f = if rng.random_bool(0.5) && !deep.is_empty() {
                *pick(rng, &deep)
            } else {
                *pick(rng, fields)
            };
            let mut was = [0u8; 8];
            was[..f.width].copy_from_slice(&bytes[f.at..f.at + f.width]);
            let new = field_value(rng, f.width, u64::from_le_bytes(was));
            bytes[f.at..f.at + f.width].copy_from_slice(&new);
            format!("{} at {}", f.what, f.at)
        }
        6 => {
            flip_bytes(rng, bytes, 0..header_end);
            "flip in header".into()
        }
        7 => {
            flip_bytes(rng, bytes, 0..len);
            "flip anywhere".into()
        }
        8 => {
            let keep = if rng.random_bool(0.5) {
                rng.random_range(0..=header_end)
            } else {
                rng.random_range(0..=len)
            };
            bytes.truncate(keep);
            format!("truncate to {keep}")
        }
        9 if len < 8 => {
            // An earlier cut took the version field too.
            flip_bytes(rng, bytes, 0..len);
            "flip anywhere".into()
        }
        9 => {
            // Another version: lengths read at the other width.
            let v: u32 = *pick(rng, &[0, 1, 2, 3, 4, u32::MAX]);
            bytes[4..8].copy_from_slice(&v.to_le_bytes());
            format!("version {v}")
        }
        10 => {
            // Bytes inserted or removed at a field: everything after shifts.
            let f = *pick(rng, fields);
            if rng.random_bool(0.5) {
                let n = rng.random_range(1..=8).min(bytes.len() - f.at);
                bytes.drain(f.at..f.at + n);
                format!("remove {n} at {}", f.at)
            } else {
                let n = rng.random_range(1..=8);
                for _ in 0..n {
                    bytes.insert(f.at, rng.random());
                }
                format!("insert {n} at {}", f.at)
            }
        }
        _ => {
            // The alignment, whatever else: 0, 1, odd, huge.
            let Some(f) = fields.iter().find(|f| f.what == "u32 value").copied() else {
                return "no alignment left".into();
            };
            let v: u32 = *pick(rng, &[0, 1, 3, 7, 64, 4096, u32::MAX, 1 << 31]);
            bytes[f.at..f.at + 4].copy_from_slice(&v.to_le_bytes());
            format!("alignment {v}")
        }
    }
}

/// How far the cases got.
#[derive(Default, Debug)]
struct Reached {
    header_read: u64,
    tensors_read: u64,
    imported: u64,
}

/// `read_gguf`, every tensor read and dequantized, then the import.
fn exercise(path: &Path, out: &Path, dtype: DType, reached: &mut Reached) -> Result<(), String> {
    let name = path.file_name().unwrap().to_str().unwrap().to_string();
    let named = |e: anyhow::Error| {
        let msg = format!("{e:#}");
        assert!(
            msg.contains(&name),
            "an error that does not name the file: {msg}"
        );
        msg
    };
    match read_gguf(path) {
        Ok((content, mut reader)) => {
            reached.header_read += 1;
            let mut names: Vec<&String> = content.tensor_infos.keys().collect();
            names.sort();
            for t in names {
                if let Ok(q) = content.tensor(&mut reader, t, &Device::Cpu) {
                    if q.dequantize(&Device::Cpu).is_ok() {
                        reached.tensors_read += 1;
                    }
                }
            }
        }
        Err(e) => {
            named(e);
        }
    }
    let result = import_gguf(path, out, dtype).map(|_| ()).map_err(named);
    if out.exists() {
        assert!(result.is_ok(), "a failed import left {}", out.display());
        std::fs::remove_dir_all(out).unwrap();
        reached.imported += 1;
    }
    result
}

#[test]
fn fuzz_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("case.gguf");
    let out = dir.path().join("out");
    let bases = [gguf(false), gguf(true)];
    // As written, both versions import.
    let mut reached = Reached::default();
    for (bytes, _) in &bases {
        std::fs::write(&path, bytes).unwrap();
        exercise(&path, &out, DType::F32, &mut reached).unwrap();
    }
    reached = Reached::default();
    fuzz_harness::run("gguf", 250, CASE_BOUND, |rng, _| {
        let (base, fields) = pick(rng, &bases);
        let mut bytes = base.clone();
        let mut done = Vec::new();
        let mutations = *pick(rng, &[1, 1, 1, 1, 1, 1, 2, 2, 2, 3]);
        for _ in 0..mutations {
            done.push(mutate(rng, &mut bytes, fields));
        }
        std::fs::write(&path, &bytes).unwrap();
        let dtype = *pick(rng, &[DType::F32, DType::F16, DType::BF16]);
        let result = exercise(&path, &out, dtype, &mut reached);
        if std::env::var_os("BITSTACK_FUZZ_DEBUG").is_some() {
            eprintln!("{done:?}, {dtype:?}: {result:?}");
        }
    });
    println!("fuzz gguf: reached {reached:?} (tensors: each one read and dequantized)");
}

// ---- Regressions: what the fuzzing found --------------------------------------

/// `general.alignment` = 0 (as u32 or i32) made candle divide by zero while
/// reading the header; it is an error naming the key and the file.
#[test]
fn regression_alignment_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aligned.gguf");
    for v1 in [false, true] {
        for ty in [4u32, 5] {
            let (mut bytes, fields) = gguf(v1);
            let value = fields.iter().position(|f| f.what == "u32 value").unwrap();
            let (ty_at, value_at) = (fields[value - 1].at, fields[value].at);
            bytes[ty_at..ty_at + 4].copy_from_slice(&ty.to_le_bytes());
            bytes[value_at..value_at + 4].copy_from_slice(&0u32.to_le_bytes());
            std::fs::write(&path, &bytes).unwrap();
            let e = format!("{:#}", read_gguf(&path).err().unwrap());
            assert!(
                e.contains("general.alignment") && e.contains("aligned.gguf"),
                "{e}"
            );
            let e = format!(
                "{:#}",
                import_gguf(&path, &dir.path().join("out"), DType::F32).unwrap_err()
            );
            assert!(e.contains("general.alignment"), "{e}");
        }
    }
}

/// A special token id past the vocabulary failed the import with an
/// error that did not name the file (and only after every tensor was
/// read); it names both the file and the key, before the tensors.
#[test]
fn regression_bad_special_token_id_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.gguf");
    let (mut bytes, _) = gguf(false);
    let key = b"tokenizer.ggml.bos_token_id";
    let end = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    // The value follows its type (u32).
    bytes[end + 4..end + 8].copy_from_slice(&(1u32 << 31).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = format!(
        "{:#}",
        import_gguf(&path, &dir.path().join("out"), DType::F32).unwrap_err()
    );
    assert!(
        e.contains("tokens.gguf") && e.contains("tokenizer.ggml.bos_token_id"),
        "{e}"
    );
}
