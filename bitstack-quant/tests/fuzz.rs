//! Hostile input, fuzzed: mutated safetensors files through the tensor
//! store, mutated checkpoints (config.json, both block order formats, the
//! shards and their index) through open, plan, load, grow and a forward,
//! and random budget strings. Every case must give `Ok` or an error: no
//! panic, no hang, no allocation far beyond the input's size.
//!
//! See `tests/fuzz_harness` at the workspace root for the seeds, the case
//! counts, the allocation bound and how to replay a case;
//! `scripts/fuzz.sh SECONDS` runs long.

#[path = "../../tests/fuzz_harness/mod.rs"]
mod fuzz_harness;

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use bitstack_quant::format::budget::Budget;
use bitstack_quant::format::checkpoint::Checkpoint;
use bitstack_quant::format::config::ModelConfig;
use bitstack_quant::format::dense::DenseDtype;
use bitstack_quant::format::grid::GridConfig;
use bitstack_quant::format::order::{BlockOrder, Geometry, ORDER_FILE, REFERENCE_FILE};
use bitstack_quant::format::store::TensorStore;
use bitstack_quant::format::synthetic::SyntheticSpec;
use bitstack_quant::method::compress::{compress, CompressOptions};
use bitstack_quant::runtime::elastic::BitStackHandle;
use candle_core::{Device, Tensor};
use fuzz_harness::{flip_bytes, nasty_u64, pick, CASE_BOUND, MIB};
use rand::rngs::StdRng;
use rand::Rng;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

// ---- JSON mutations ---------------------------------------------------------

/// Every JSON pointer into `v` (the root is "").
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let key = k.replace('~', "~0").replace('/', "~1");
                pointers(child, format!("{at}/{key}"), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                pointers(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

/// A number a size, a count or a factor could be asked to hold.
fn nasty_number(rng: &mut StdRng) -> Value {
    match rng.random_range(0..12) {
        0 => json!(0),
        1 => json!(1),
        2 => json!(-1),
        3 => json!(u64::MAX),
        4 => json!(i64::MIN),
        5 => json!(1e308),
        6 => json!(-1e308),
        7 => json!(rng.random_range(-3.0..3.0f64)),
        8 => json!(1e-300),
        9 => json!(9_007_199_254_740_993u64),
        10 => json!(nasty_u64(rng, 48)),
        _ => json!(rng.random_range(0..200)),
    }
}

/// A random JSON value, mostly the kinds config and order files hold.
fn nasty_value(rng: &mut StdRng, names: &[&str]) -> Value {
    match rng.random_range(0..10) {
        0..=3 => nasty_number(rng),
        4 => json!(pick(rng, names)),
        5 => json!(pick(
            rng,
            &[
                "",
                "NaN",
                "-1",
                "1e400",
                "llama",
                "bitstack",
                "float16",
                "bf16",
                "\u{0}",
                "ä☃𝄞"
            ]
        )),
        6 => json!(rng.random_bool(0.5)),
        7 => Value::Null,
        8 => json!([]),
        _ => json!({}),
    }
}

/// Keys (with values) that the readers know, to insert where they may
/// matter: optional config fields, quantization fields, order fields.
fn known_key(rng: &mut StdRng) -> (String, Value) {
    let (any_group, any_outliers) = (nasty_number(rng), nasty_number(rng));
    let any_block = nasty_number(rng);
    let grid = json!({
        "planes": nasty_number(rng),
        "group": pick(rng, &[json!(16), json!(8), json!(0), json!(512), any_group]).clone(),
        "outliers": pick(rng, &[json!(0), json!(1), json!(8), any_outliers]).clone()
    });
    let rope = json!({
        "rope_type": pick(rng, &["llama3", "linear", "default", "yarn"]).to_string(),
        "factor": nasty_number(rng),
        "low_freq_factor": nasty_number(rng),
        "high_freq_factor": nasty_number(rng),
        "original_max_position_embeddings": nasty_number(rng)
    });
    let choices: Vec<(&str, Value)> = vec![
        ("head_dim", nasty_number(rng)),
        ("num_key_value_heads", nasty_number(rng)),
        ("max_position_embeddings", nasty_number(rng)),
        ("rope_theta", nasty_number(rng)),
        ("rope_scaling", rope),
        ("tie_word_embeddings", json!(rng.random_bool(0.5))),
        ("attention_bias", json!(rng.random_bool(0.5))),
        (
            "torch_dtype",
            json!(pick(rng, &["float16", "bfloat16", "float32", "int8"])),
        ),
        (
            "model_type",
            json!(pick(rng, &["llama", "qwen2", "mistral", "gpt2"])),
        ),
        ("format_version", json!(pick(rng, &[1, 2, 3, 4, 0]))),
        ("grid", grid),
        (
            "rotation",
            json!({
                "block": pick(rng, &[json!(64), json!(8), json!(0), json!(48), json!(1u64 << 40), any_block]).clone(),
                "seed": nasty_number(rng)
            }),
        ),
        (
            "k_per_linear",
            json!({ "model.layers.0.mlp.up_proj": nasty_number(rng), "model.layers.1.self_attn.q_proj": 1 }),
        ),
        ("niter", nasty_number(rng)),
        ("k", nasty_number(rng)),
        (
            "measured",
            json!([{ "level": nasty_number(rng), "ppl": nasty_number(rng), "windows": 1, "text": "t" }]),
        ),
        (
            "dense",
            json!({ "model": "m", "ppl": nasty_number(rng), "windows": nasty_number(rng), "text": "t" }),
        ),
    ];
    let (k, v) = choices[rng.random_range(0..choices.len())].clone();
    (k.to_string(), v)
}

/// One structural or value edit at a random place of `doc`: replace a
/// value, delete a key or element, insert a known key, duplicate, swap or
/// truncate array elements, nudge a number.
fn mutate_json(rng: &mut StdRng, doc: &mut Value, names: &[&str]) {
    let mut all = Vec::new();
    pointers(doc, String::new(), &mut all);
    let at = pick(rng, &all).clone();
    let parent = at.rfind('/').map(|i| at[..i].to_string());
    let last = at
        .rsplit('/')
        .next()
        .unwrap_or("")
        .replace("~1", "/")
        .replace("~0", "~");
    match rng.random_range(0..8) {
        // Replace.
        0 | 1 => {
            let v = nasty_value(rng, names);
            *doc.pointer_mut(&at).unwrap() = v;
        }
        // Delete from the parent.
        2 => {
            if let Some(p) = parent {
                match doc.pointer_mut(&p).unwrap() {
                    Value::Object(map) => {
                        map.remove(&last);
                    }
                    Value::Array(items) => {
                        if let Ok(i) = last.parse::<usize>() {
                            if i < items.len() {
                                items.remove(i);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        // Insert a known key into an object.
        3 => {
            let (k, v) = known_key(rng);
            let into = if doc.pointer(&at).is_some_and(Value::is_object) {
                at
            } else {
                String::new()
            };
            if let Some(Value::Object(map)) = doc.pointer_mut(&into) {
                map.insert(k, v);
            }
        }
        // Array surgery.
        4 => {
            if let Value::Array(items) = doc.pointer_mut(&at).unwrap() {
                if !items.is_empty() {
                    let (i, j) = (
                        rng.random_range(0..items.len()),
                        rng.random_range(0..items.len()),
                    );
                    match rng.random_range(0..3) {
                        0 => items.swap(i, j),
                        1 => {
                            let dup = items[i].clone();
                            items.insert(j, dup);
                        }
                        _ => items.truncate(i),
                    }
                }
            }
        }
        // Nudge a number.
        5 => {
            let v = doc.pointer_mut(&at).unwrap();
            if let Some(x) = v.as_u64() {
                *v = match rng.random_range(0..5) {
                    0 => json!(x.wrapping_add(1)),
                    1 => json!(x.wrapping_sub(1)),
                    2 => json!(x.wrapping_mul(2)),
                    3 => json!(-(x as i64)),
                    _ => json!(x as f64 + 0.5),
                };
            } else {
                *v = nasty_number(rng);
            }
        }
        // Rename a key.
        6 => {
            if let Some(p) = parent {
                if let Value::Object(map) = doc.pointer_mut(&p).unwrap() {
                    if let Some(v) = map.remove(&last) {
                        let name = pick(rng, names).to_string();
                        map.insert(name, v);
                    }
                }
            }
        }
        // A string becomes a near neighbour.
        _ => {
            let v = doc.pointer_mut(&at).unwrap();
            if let Some(s) = v.as_str() {
                let mut s = s.to_string();
                match rng.random_range(0..3) {
                    0 => s.push(*pick(rng, &['0', '9', '.', ' ', 'é'])),
                    1 => {
                        s.pop();
                    }
                    _ => s = s.replace('0', "1").replace("layers.1", "layers.7"),
                }
                *v = json!(s);
            } else {
                *v = nasty_value(rng, names);
            }
        }
    }
}

/// Names the files use, for renames and string values.
const NAMES: &[&str] = &[
    "model.layers.0.mlp.up_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.9.mlp.down_proj",
    "layer.0.mlp.up_proj",
    "layer.1.self_attn.o_proj",
    "layer.x",
    "model.embed_tokens.weight",
    "model.norm.weight",
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "quantization_config",
    "order",
    "memory",
    "layers",
    "dtype",
    "shape",
    "data_offsets",
    "__metadata__",
];

// ---- Safetensors mutations --------------------------------------------------

/// The header's JSON and where the data starts, if `bytes` has a header.
fn header(bytes: &[u8]) -> Option<(Value, usize)> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let json = serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    Some((json, 8 + n))
}

const DTYPES: &[&str] = &[
    "F32", "F16", "BF16", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F64", "BOOL",
    "F8_E4M3", "F8_E5M2", "F4", "F6_E2M3", "E8M0", "C64", "Q4", "f32", "",
];

/// A shape-aware edit of one tensor's header entry.
fn edit_entry(rng: &mut StdRng, entry: &mut Value) {
    let Some(map) = entry.as_object_mut() else {
        return;
    };
    match rng.random_range(0..6) {
        0 => {
            map.insert("dtype".into(), json!(pick(rng, DTYPES)));
        }
        1 => {
            if let Some(Value::Array(shape)) = map.get_mut("shape") {
                match rng.random_range(0..5) {
                    0 if !shape.is_empty() => {
                        let i = rng.random_range(0..shape.len());
                        shape[i] = json!(nasty_u64(rng, shape[i].as_u64().unwrap_or(1)));
                    }
                    1 => shape.push(json!(rng.random_range(0..4))),
                    2 => {
                        shape.pop();
                    }
                    3 => shape.reverse(),
                    _ => {
                        // Same element count, other dims.
                        let n: u64 = shape.iter().filter_map(Value::as_u64).product();
                        *shape = vec![json!(1), json!(n)];
                    }
                }
            }
        }
        2 | 3 => {
            if let Some(Value::Array(offsets)) = map.get_mut("data_offsets") {
                if offsets.len() == 2 {
                    let i = rng.random_range(0..2);
                    let was = offsets[i].as_u64().unwrap_or(0);
                    offsets[i] = json!(nasty_u64(rng, was));
                }
            }
        }
        4 => {
            if let Some(Value::Array(offsets)) = map.get_mut("data_offsets") {
                offsets.reverse();
            }
        }
        _ => {
            let key = pick(rng, &["dtype", "shape", "data_offsets"]).to_string();
            map.remove(&key);
        }
    }
}

/// `header` re-serialized (padded with spaces to 8 bytes, as safetensors
/// writes it) in front of `data`.
fn with_header(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut text = serde_json::to_vec(header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(data);
    out
}

/// One mutation of a safetensors file (see the module doc).
fn mutate_safetensors(rng: &mut StdRng, bytes: &mut Vec<u8>) -> &'static str {
    let (json, base) = header(bytes).unwrap_or((Value::Null, bytes.len().min(8)));
    let len = bytes.len();
    match rng.random_range(0..9) {
        0 => {
            flip_bytes(rng, bytes, 0..len);
            "flip anywhere"
        }
        1 => {
            flip_bytes(rng, bytes, 8.min(len)..base);
            "flip in header"
        }
        2 => {
            flip_bytes(rng, bytes, base..len);
            "flip in data"
        }
        3 => {
            let keep = if rng.random_bool(0.5) {
                len.saturating_sub(rng.random_range(1..64))
            } else {
                rng.random_range(0..=len)
            };
            bytes.truncate(keep);
            "truncate"
        }
        4 => {
            for _ in 0..rng.random_range(1..64) {
                bytes.push(rng.random());
            }
            "append"
        }
        5 => {
            let n = nasty_u64(rng, (base as u64).saturating_sub(8));
            if bytes.len() >= 8 {
                bytes[..8].copy_from_slice(&n.to_le_bytes());
            }
            "header length"
        }
        6 | 7 => {
            let mut json = json;
            let names: Vec<String> = json
                .as_object()
                .map(|m| m.keys().filter(|k| *k != "__metadata__").cloned().collect())
                .unwrap_or_default();
            if names.is_empty() {
                return "no header to edit";
            }
            for _ in 0..rng.random_range(1..=3) {
                let name = pick(rng, &names).clone();
                if rng.random_bool(0.75) {
                    if let Some(entry) = json.get_mut(&name) {
                        edit_entry(rng, entry);
                    }
                } else {
                    let extra: Vec<&str> = names.iter().map(String::as_str).collect();
                    mutate_json(rng, &mut json, &extra);
                }
            }
            let data = bytes[base..].to_vec();
            *bytes = with_header(&json, &data);
            "header JSON"
        }
        _ => {
            // Metadata: drop it, or change a value (a checksum).
            let mut json = json;
            if let Some(map) = json.as_object_mut() {
                if rng.random_bool(0.3) {
                    map.remove("__metadata__");
                } else if let Some(Value::Object(meta)) = map.get_mut("__metadata__") {
                    let keys: Vec<String> = meta.keys().cloned().collect();
                    if !keys.is_empty() {
                        let k = pick(rng, &keys).clone();
                        meta.insert(k, nasty_value(rng, NAMES));
                    }
                } else {
                    map.insert(
                        "__metadata__".into(),
                        json!({ "x": nasty_value(rng, NAMES) }),
                    );
                }
            }
            let data = bytes[base..].to_vec();
            *bytes = with_header(&json, &data);
            "metadata"
        }
    }
}

// ---- Target: the tensor store ----------------------------------------------

/// A random tensor: name, dtype, shape, little-endian bytes (a few
/// non-finite floats now and then).
fn random_tensor(rng: &mut StdRng, i: usize) -> (String, Dtype, Vec<usize>, Vec<u8>) {
    let dtype = *pick(
        rng,
        &[Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::U8, Dtype::I64],
    );
    let rank = rng.random_range(0..=3);
    let shape: Vec<usize> = (0..rank).map(|_| rng.random_range(0..=9)).collect();
    let count: usize = shape.iter().product();
    let mut bytes: Vec<u8> = (0..count * dtype.bitsize() / 8)
        .map(|_| rng.random())
        .collect();
    // Mostly finite floats: a clean file must read back.
    let size = dtype.bitsize() / 8;
    for chunk in bytes.chunks_exact_mut(size) {
        let special = rng.random_bool(0.02);
        match dtype {
            Dtype::F32 if !special => {
                chunk.copy_from_slice(&rng.random_range(-4.0..4.0f32).to_le_bytes())
            }
            Dtype::F16 if !special => chunk
                .copy_from_slice(&half::f16::from_f32(rng.random_range(-4.0..4.0)).to_le_bytes()),
            Dtype::BF16 if !special => chunk
                .copy_from_slice(&half::bf16::from_f32(rng.random_range(-4.0..4.0)).to_le_bytes()),
            _ => {}
        }
    }
    let name = match rng.random_range(0..4) {
        0 => format!("model.layers.{i}.mlp.up_proj.weight"),
        1 => format!("t{i}"),
        2 => format!("ä.{i}"),
        _ => format!("x{}.{i}", rng.random_range(0..1000)),
    };
    (name, dtype, shape, bytes)
}

fn serialize(
    tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Vec<u8> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::tensor::serialize(views, metadata).unwrap()
}

/// Every read the store offers, on every tensor it lists, plus a few
/// names it does not hold and wrong dtypes and shapes.
fn read_everything(store: &TensorStore, rng: &mut StdRng) {
    let names: Vec<String> = store.names().map(str::to_string).collect();
    for name in names.iter().map(String::as_str).chain(["missing", ""]) {
        let _ = store.location(name);
        let _ = store.file_of(name);
        let shape = store.shape(name).map(<[usize]>::to_vec).unwrap_or_default();
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::U8] {
            let _ = store.check(name, dtype, &shape);
            let _ = store.bytes(name, dtype, &shape);
        }
        let mut wrong = shape.clone();
        wrong.push(rng.random_range(0..3));
        let _ = store.bytes(name, Dtype::U8, &wrong);
        let _ = store.f32(name);
        let _ = store.dense_dtype(name);
        let _ = store.dense_shaped(name, &shape);
        let _ = store.f32_shaped(name, &shape);
        let _ = store.f16_shaped(name, &shape);
    }
    let _ = store.meta("checksum");
}

fn store_case(rng: &mut StdRng, dir: &Path) {
    let files = rng.random_range(1..=2);
    let mut paths = Vec::new();
    let mut written = Vec::new();
    for f in 0..files {
        let tensors: Vec<_> = (0..rng.random_range(0..=5))
            .map(|i| random_tensor(rng, i + 10 * f))
            .collect();
        let metadata = rng
            .random_bool(0.5)
            .then(|| [("k".to_string(), format!("v{}", rng.random_range(0..3)))].into());
        let mut bytes = serialize(&tensors, metadata);
        let clean = rng.random_bool(0.1);
        if !clean {
            for _ in 0..rng.random_range(1..=2) {
                mutate_safetensors(rng, &mut bytes);
            }
        }
        let path = dir.join(format!("model-{f}.safetensors"));
        std::fs::write(&path, &bytes).unwrap();
        paths.push(path);
        written.push((clean, tensors));
    }
    let store = match TensorStore::open(&paths) {
        Ok(s) => s,
        Err(e) => {
            assert!(!format!("{e:#}").is_empty());
            return;
        }
    };
    read_everything(&store, rng);
    // A clean single file reads back exactly what was written.
    if let [(true, tensors)] = written.as_slice() {
        for (name, dtype, shape, bytes) in tensors {
            assert_eq!(&store.bytes(name, *dtype, shape).unwrap(), bytes, "{name}");
        }
    }
}

#[test]
fn fuzz_store() {
    let dir = tempfile::tempdir().unwrap();
    fuzz_harness::run("store", 400, CASE_BOUND, |rng, _| {
        store_case(rng, dir.path())
    });
}

// ---- Targets: checkpoints -----------------------------------------------------

/// The pristine checkpoints every checkpoint case starts from: an AVD one
/// from `compress`, a grid one from `compress` (format version 2), and a
/// qwen2 one with an untied head, bf16 dense parts and random blocks.
struct Pristine {
    _root: tempfile::TempDir,
    dirs: Vec<PathBuf>,
}

fn pristine() -> &'static Pristine {
    static P: OnceLock<Pristine> = OnceLock::new();
    P.get_or_init(|| {
        let root = tempfile::tempdir().unwrap();
        let dense = root.path().join("dense");
        SyntheticSpec::default().write(&dense).unwrap();
        let calib = root.path().join("calib.txt");
        std::fs::write(&calib, "hostile input, fuzzed. ".repeat(40)).unwrap();
        let avd = root.path().join("avd");
        compress(&dense, &avd, &common::small_options(calib.clone(), 2, 3)).unwrap();
        let grid = root.path().join("grid");
        let options = CompressOptions {
            grid: Some(GridConfig {
                planes: 2,
                group: 16,
                ..GridConfig::new(2)
            }),
            ..common::small_options(calib, 2, 1)
        };
        compress(&dense, &grid, &options).unwrap();
        let qwen = root.path().join("qwen");
        SyntheticSpec {
            model_type: "qwen2",
            tied: false,
            dense_dtype: DenseDtype::Bf16,
            seed: 7,
            ..SyntheticSpec::default()
        }
        .write_bitstack(&qwen, 3, 2)
        .unwrap();
        // Order files in both formats, to be damaged: shuffled orders for
        // the first two, the round-robin one for the last.
        save_order(&avd, Some(1));
        save_order(&grid, Some(2));
        save_order(&qwen, None);
        // Each opens and grows as it is.
        let dirs = vec![avd, grid, qwen];
        for d in &dirs {
            let h = BitStackHandle::open(d, None, &Device::Cpu).unwrap();
            h.set_level(0).unwrap();
            assert!(Checkpoint::open(d).is_ok());
        }
        Pristine { _root: root, dirs }
    })
}

/// Saves a block order (both files) in checkpoint `dir`: the round-robin
/// one, or a random interleaving of the linears' blocks from `shuffle`.
fn save_order(dir: &Path, shuffle: Option<u64>) {
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let geometry = Geometry::from_config(&cfg).unwrap();
    let mut order = BlockOrder::round_robin(&geometry);
    if let Some(seed) = shuffle {
        let mut rng = fuzz_harness::case_rng(seed, 0);
        let mut next: Vec<usize> = vec![1; geometry.linears.len()];
        order.order.clear();
        while let Some(open) = {
            let open: Vec<usize> = (0..next.len())
                .filter(|&i| next[i] < geometry.linears[i].stored)
                .collect();
            (!open.is_empty()).then_some(open)
        } {
            let i = *pick(&mut rng, &open);
            order
                .order
                .push((geometry.linears[i].name.clone(), next[i]));
            next[i] += 1;
        }
        order.method = "fuzz-shuffle".into();
    }
    order.save(dir, &geometry).unwrap();
}

/// A working copy of one pristine checkpoint, restored file by file after
/// each case.
struct Work {
    dir: PathBuf,
    files: BTreeMap<String, Vec<u8>>,
}

impl Work {
    fn new(pristine: &Path, dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let mut files = BTreeMap::new();
        for e in std::fs::read_dir(pristine).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let bytes = std::fs::read(e.path()).unwrap();
            std::fs::write(dir.join(&name), &bytes).unwrap();
            files.insert(name, bytes);
        }
        Self { dir, files }
    }

    fn shards(&self) -> Vec<String> {
        self.files
            .keys()
            .filter(|n| n.ends_with(".safetensors"))
            .cloned()
            .collect()
    }

    /// Puts every file back as it was (and removes any other).
    fn restore(&self) {
        for e in std::fs::read_dir(&self.dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            match self.files.get(&name) {
                Some(bytes) if std::fs::read(e.path()).ok().as_ref() == Some(bytes) => {}
                Some(_) => {}
                None => std::fs::remove_file(e.path()).unwrap(),
            }
        }
        for (name, bytes) in &self.files {
            let path = self.dir.join(name);
            if std::fs::read(&path).ok().as_ref() != Some(bytes) {
                std::fs::write(&path, bytes).unwrap();
            }
        }
    }
}

/// What the checkpoint cases reached, printed at the end of a target.
#[derive(Default, Debug)]
struct Reached {
    refused_at_open: u64,
    opened: u64,
    loaded: u64,
    grown: u64,
    forward: u64,
}

/// Open, plan at several budgets, load at a small budget, grow to the top
/// (after `between`, which may rewrite a shard under the open model), run
/// a forward, shrink. Errors are fine; panics are not.
fn exercise(
    dir: &Path,
    rng: &mut StdRng,
    reached: &mut Reached,
    between: impl FnOnce(&mut StdRng),
) {
    let ck = match Checkpoint::open(dir) {
        Ok(ck) => ck,
        Err(e) => {
            assert!(!format!("{e:#}").is_empty());
            reached.refused_at_open += 1;
            return;
        }
    };
    reached.opened += 1;
    let ladder = ck.ladder();
    let floor = ladder[0].total_bytes as u64;
    let top = ladder.last().unwrap().total_bytes as u64;
    let small = floor + rng.random_range(0..=(top.saturating_sub(floor)) / 3);
    for budget in [
        Budget::Bytes(small),
        Budget::Bytes(floor.saturating_sub(1)),
        Budget::Bytes(u64::MAX),
        Budget::BitsPerWeight(rng.random_range(0.01..40.0)),
        Budget::Percent(rng.random_range(0.01..=100.0)),
    ] {
        let _ = ck.plan(budget);
    }
    let _ = ck.plan_level(rng.random_range(0..ladder.len() + 2));
    let _ = ck.plan_all();
    drop(ck);
    let handle = match BitStackHandle::open(dir, Some(small), &Device::Cpu) {
        Ok(h) => h,
        Err(e) => {
            assert!(!format!("{e:#}").is_empty());
            return;
        }
    };
    reached.loaded += 1;
    between(rng);
    if handle.set_level(handle.max_level()).is_ok() {
        reached.grown += 1;
    }
    let tokens = Tensor::new(&[[1u32, 7, 42, 255]], &Device::Cpu).unwrap();
    if handle.snapshot().forward(&tokens).is_ok() {
        reached.forward += 1;
    }
    let _ = handle.set_level(0);
    let _ = handle.set_budget(small);
}

/// The work copies of the pristine checkpoints for one target.
fn work_copies(root: &Path) -> Vec<Work> {
    pristine()
        .dirs
        .iter()
        .enumerate()
        .map(|(i, d)| Work::new(d, root.join(format!("w{i}"))))
        .collect()
}

fn mutate_json_file(rng: &mut StdRng, path: &Path, edits: usize) {
    let text = std::fs::read(path).unwrap();
    let mut doc: Value = serde_json::from_slice(&text).unwrap();
    for _ in 0..edits {
        mutate_json(rng, &mut doc, NAMES);
    }
    std::fs::write(path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
}

/// Byte-level damage to a text file: truncation or a few flipped bytes.
fn damage_text(rng: &mut StdRng, path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    if rng.random_bool(0.5) {
        let keep = rng.random_range(0..=bytes.len());
        bytes.truncate(keep);
    } else {
        let len = bytes.len();
        flip_bytes(rng, &mut bytes, 0..len);
    }
    std::fs::write(path, bytes).unwrap();
}

/// `BITSTACK_FUZZ_DEBUG` set: print what each case feeds in (for replays).
fn debug() -> bool {
    std::env::var_os("BITSTACK_FUZZ_DEBUG").is_some()
}

fn report(target: &str, reached: &Reached) {
    println!("fuzz {target}: reached {reached:?}");
}

#[test]
fn fuzz_config() {
    let _alone = fuzz_harness::exclusive();
    let root = tempfile::tempdir().unwrap();
    let work = work_copies(root.path());
    let mut reached = Reached::default();
    fuzz_harness::run("config", 300, CASE_BOUND, |rng, _| {
        let w = &work[rng.random_range(0..work.len())];
        let path = w.dir.join("config.json");
        if rng.random_bool(0.9) {
            let edits = rng.random_range(1..=3);
            mutate_json_file(rng, &path, edits);
        } else {
            damage_text(rng, &path);
        }
        // Some without order files: the round-robin order of whatever the
        // config now says, unchecked by an order written for the old one.
        if rng.random_bool(0.3) {
            std::fs::remove_file(w.dir.join(ORDER_FILE)).unwrap();
            std::fs::remove_file(w.dir.join(REFERENCE_FILE)).unwrap();
        }
        if debug() {
            eprintln!(
                "{}",
                String::from_utf8_lossy(&std::fs::read(&path).unwrap())
            );
        }
        exercise(&w.dir, rng, &mut reached, |_| {});
        w.restore();
    });
    report("config", &reached);
}

#[test]
fn fuzz_order() {
    let _alone = fuzz_harness::exclusive();
    let root = tempfile::tempdir().unwrap();
    let work = work_copies(root.path());
    let mut reached = Reached::default();
    fuzz_harness::run("order", 300, CASE_BOUND, |rng, _| {
        let w = &work[rng.random_range(0..work.len())];
        let (ours, theirs) = (w.dir.join(ORDER_FILE), w.dir.join(REFERENCE_FILE));
        // Which format is read: ours when present, else the reference's,
        // else none (the round-robin order).
        let target = match rng.random_range(0..10) {
            0..=4 => ours,
            5..=8 => {
                std::fs::remove_file(&ours).unwrap();
                theirs
            }
            _ => {
                std::fs::remove_file(&ours).unwrap();
                std::fs::remove_file(&theirs).unwrap();
                exercise(&w.dir, rng, &mut reached, |_| {});
                w.restore();
                return;
            }
        };
        if rng.random_bool(0.85) {
            let edits = rng.random_range(1..=3);
            mutate_json_file(rng, &target, edits);
        } else {
            damage_text(rng, &target);
        }
        exercise(&w.dir, rng, &mut reached, |_| {});
        w.restore();
    });
    report("order", &reached);
}

#[test]
fn fuzz_shards() {
    let _alone = fuzz_harness::exclusive();
    let root = tempfile::tempdir().unwrap();
    let work = work_copies(root.path());
    let mut reached = Reached::default();
    fuzz_harness::run("shards", 300, CASE_BOUND, |rng, _| {
        let w = &work[rng.random_range(0..work.len())];
        let shards = w.shards();
        let shard = w.dir.join(pick(rng, &shards));
        let index = w.dir.join("model.safetensors.index.json");
        let mutate_shard = |rng: &mut StdRng| {
            let mut bytes = std::fs::read(&shard).unwrap();
            for _ in 0..rng.random_range(1..=2) {
                mutate_safetensors(rng, &mut bytes);
            }
            std::fs::write(&shard, bytes).unwrap();
        };
        match rng.random_range(0..10) {
            // Damaged before it is opened.
            0..=5 => {
                mutate_shard(rng);
                exercise(&w.dir, rng, &mut reached, |_| {});
            }
            // Rewritten (or truncated, or removed) under the open model,
            // before the grow reads more blocks.
            6..=7 => exercise(&w.dir, rng, &mut reached, |rng| {
                if rng.random_bool(0.2) {
                    std::fs::remove_file(&shard).unwrap();
                } else {
                    mutate_shard(rng);
                }
            }),
            // The index.
            8 if index.exists() => {
                if rng.random_bool(0.8) {
                    mutate_json_file(rng, &index, 1);
                } else {
                    damage_text(rng, &index);
                }
                exercise(&w.dir, rng, &mut reached, |_| {});
            }
            // A shard missing.
            _ => {
                std::fs::remove_file(&shard).unwrap();
                exercise(&w.dir, rng, &mut reached, |_| {});
            }
        }
        w.restore();
    });
    report("shards", &reached);
}

// ---- Target: budget strings --------------------------------------------------

/// A string near a budget: a number (plain, huge, tiny, negative, NaN,
/// hex, unicode digits) and a unit (any case, spaced, unicode look-alikes),
/// or junk.
fn budget_string(rng: &mut StdRng) -> String {
    let number = match rng.random_range(0..14) {
        0 => format!("{}", rng.random_range(0..100_000)),
        1 => format!("{}", rng.random_range(-5.0..120.0f64)),
        2 => pick(
            rng,
            &[
                "1e400",
                "1e-400",
                "-0",
                "0",
                "NaN",
                "inf",
                "-inf",
                "+3",
                ".5",
                "5.",
                "1_000",
                "0x10",
                "1e18",
                "18446744073709551616",
                "9007199254740993",
            ],
        )
        .to_string(),
        3 => "9".repeat(rng.random_range(1..400)),
        4 => pick(rng, &["٣", "３", "①", "Ⅳ", "४"]).to_string(),
        5 => format!(
            "{:e}",
            rng.random::<f64>() * 10f64.powi(rng.random_range(-30..30))
        ),
        6 => String::new(),
        7 => format!("{}", nasty_u64(rng, 1 << 30)),
        _ => format!("{}", rng.random_range(0.0..5000.0f64)),
    };
    let unit = *pick(
        rng,
        &[
            "B",
            "b",
            "KiB",
            "kib",
            "MiB",
            "mib",
            "GiB",
            "TiB",
            "KB",
            "MB",
            "gb",
            "TB",
            "bpw",
            "BPW",
            "%",
            "",
            " MiB",
            "MiB ",
            "Mib",
            "M",
            "KİB",
            "ＭiB",
            "%%",
            "bpw%",
            "Kelvin",
            "\u{212a}iB",
            "mıb",
            "\u{0}",
            "☃",
        ],
    );
    let mut s = match rng.random_range(0..10) {
        0 => format!("{unit}{number}"),
        1 => format!(" {number}{unit} "),
        2 => format!("{number}{unit}{unit}"),
        3 => {
            // Junk: random chars, ASCII and not.
            (0..rng.random_range(0..12))
                .map(|_| {
                    if rng.random_bool(0.7) {
                        rng.random_range(b' '..=b'~') as char
                    } else {
                        char::from_u32(rng.random_range(0x80..0x3_0000)).unwrap_or('?')
                    }
                })
                .collect()
        }
        _ => format!("{number}{unit}"),
    };
    if rng.random_bool(0.1) && !s.is_empty() {
        // Cut anywhere, even inside a character.
        let bytes = s.as_bytes();
        let cut = rng.random_range(0..bytes.len());
        s = String::from_utf8_lossy(&bytes[..cut]).into_owned();
    }
    s
}

fn budget_case(rng: &mut StdRng) {
    let s = budget_string(rng);
    if debug() {
        eprintln!("budget string {s:?} ({} bytes)", s.len());
    }
    match s.parse::<Budget>() {
        Err(e) => {
            assert!(e.to_string().contains("invalid budget"), "{s:?}: {e}");
        }
        Ok(b) => {
            match b {
                Budget::Bytes(_) => {}
                Budget::BitsPerWeight(x) => assert!(x.is_finite() && x > 0.0, "{s:?}: {b:?}"),
                Budget::Percent(p) => assert!(p > 0.0 && p <= 100.0, "{s:?}: {b:?}"),
            }
            // What it prints parses back to the same budget (bytes within
            // the precision of the f64 the parser reads them as).
            let back: Budget = b
                .to_string()
                .parse()
                .unwrap_or_else(|e| panic!("{s:?} → {b:?} → {b}: {e}"));
            match (b, back) {
                (Budget::Bytes(x), Budget::Bytes(y)) => {
                    assert!(x.abs_diff(y) as f64 <= x as f64 * 1e-15, "{s:?}: {x} → {y}")
                }
                _ => assert_eq!(b, back, "{s:?}"),
            }
            for parameters in [0, 1, 135_000_000, usize::MAX] {
                let _ = b.total_bytes(parameters);
            }
        }
    }
}

#[test]
fn fuzz_budget() {
    fuzz_harness::run("budget", 100_000, 16 * MIB, |rng, _| budget_case(rng));
}

// ---- Regressions: what the fuzzing found --------------------------------------

/// `niter: 0` in config.json with no order file used to reach
/// `unreachable!` (block 0 of a linear with no blocks read as a grid
/// plane); it is refused when the config is read.
#[test]
fn regression_niter_zero_is_refused() {
    let _alone = fuzz_harness::exclusive();
    let root = tempfile::tempdir().unwrap();
    let w = Work::new(&pristine().dirs[0], root.path().join("w"));
    let path = w.dir.join("config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    cfg["quantization_config"]["niter"] = json!(0);
    std::fs::write(&path, cfg.to_string()).unwrap();
    std::fs::remove_file(w.dir.join(ORDER_FILE)).unwrap();
    std::fs::remove_file(w.dir.join(REFERENCE_FILE)).unwrap();
    for e in [
        Checkpoint::open(&w.dir).err().unwrap(),
        BitStackHandle::open(&w.dir, Some(1 << 30), &Device::Cpu).unwrap_err(),
    ] {
        let e = format!("{e:#}");
        assert!(e.contains("niter is 0") && e.contains("config.json"), "{e}");
    }
}

/// A byte budget under one byte (`5.4e-8b`) parsed as `0B`, which prints
/// as a budget that does not parse.
#[test]
fn regression_byte_budgets_under_one_byte_are_refused() {
    for s in ["5.40653152168481e-8b", "0.5B", "0.0009KiB"] {
        let e = s.parse::<Budget>().unwrap_err();
        assert!(e.to_string().contains("invalid budget"), "{s}: {e}");
    }
    assert_eq!("1.5B".parse(), Ok(Budget::Bytes(1)));
}
