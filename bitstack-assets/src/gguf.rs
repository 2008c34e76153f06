//! GGUF (llama or qwen2 architecture) to a Hugging Face model directory.
//!
//! The output is what `LlamaForCausalLM` / `Qwen2ForCausalLM.from_pretrained` expects:
//! `config.json`, `generation_config.json`, `model.safetensors`,
//! `tokenizer.json` and `tokenizer_config.json`. Quantized GGUF weights are
//! dequantized, so the import is lossless with respect to the GGUF.

mod arch;
mod bounds;
mod dtype;
mod llama;
pub(crate) mod meta;
mod names;
pub mod rope;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device};
use names::Fix;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// What [`import_gguf`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    pub tensors: usize,
    pub parameters: usize,
    pub architecture: String,
    pub out_dir: PathBuf,
}

/// Opens a GGUF and parses its header, after checking that no length in it
/// points past the end of the file. Errors name `path`.
pub fn read_gguf(path: &Path) -> Result<(Content, BufReader<File>)> {
    let file = File::open(path).with_context(|| format!("opening GGUF {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("reading metadata of {}", path.display()))?
        .len();
    let mut reader = BufReader::new(file);
    let what = || format!("reading GGUF {}", path.display());
    bounds::check_header(&mut reader, len).with_context(what)?;
    let content = Content::read(&mut reader).with_context(what)?;
    bounds::check_tensor_data(&content, len).with_context(what)?;
    Ok((content, reader))
}

/// `out_dir` imported from `gguf` unless it is there already (it holds a
/// `config.json`): what `demo` and the tests do with the dense model of
/// the assets cache. Two processes (or threads) importing into one dir at
/// once both succeed: the one that finishes second finds the first one's
/// complete import in place of its own and drops its copy.
pub fn import_gguf_once(gguf: &Path, out_dir: &Path, dtype: DType) -> Result<()> {
    let done = || out_dir.join("config.json").exists();
    if done() {
        return Ok(());
    }
    match import_gguf(gguf, out_dir, dtype) {
        Ok(_) => Ok(()),
        // An import is renamed into place whole: a config there is a
        // complete model, made meanwhile by someone else.
        Err(_) if done() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Converts `gguf` (llama or qwen2 architecture) into a Hugging Face model directory
/// at `out_dir`, storing weights as `dtype` (F32, F16 or BF16).
///
/// `out_dir` must not exist (an empty directory is accepted). Everything is
/// written to a temp directory next to it and renamed at the end, so a
/// failed import leaves nothing behind.
pub fn import_gguf(gguf: &Path, out_dir: &Path, dtype: DType) -> Result<ImportReport> {
    llama::torch_dtype(dtype)?;
    // Checked before the GGUF is read: a bad destination fails at once.
    let out = crate::atomic::AtomicDir::create(out_dir)?;
    let (content, mut reader) = read_gguf(gguf)?;
    let file = gguf.display();

    let arch_name =
        meta::str_key(&content, "general.architecture").with_context(|| file.to_string())?;
    let arch = arch::Arch::from_gguf(arch_name).with_context(|| file.to_string())?;
    let params = llama::LlamaParams::from_gguf(&content, arch)
        .with_context(|| format!("reading {} hyperparameters from {file}", arch.name()))?;
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        bail!("{file}: rope_freqs.weight (Llama 3.1-style RoPE scaling) is not supported");
    }
    // Checking the tensor count first keeps a corrupt block count from
    // building an enormous name list.
    if params.block_count > content.tensor_infos.len() / arch.tensors_per_block() {
        bail!(
            "{file}: {} is {} but the file has only {} tensors",
            arch.key("block_count"),
            params.block_count,
            content.tensor_infos.len()
        );
    }
    let tied = !content.tensor_infos.contains_key("output.weight");
    let mappings = names::llama_tensors(&params, tied);
    check_tensor_set(&content, &mappings).with_context(|| file.to_string())?;
    let tokenizer = crate::tokenizer::tokenizer_from_gguf(&content)
        .with_context(|| format!("building the tokenizer from {file}"))?;
    // Before the tensors are read: a bad special token id fails at once.
    let tokenizer_config = crate::tokenizer::tokenizer_config_json(&content, params.context_length)
        .with_context(|| format!("reading the special tokens of {file}"))?;

    tracing::info!(
        "importing {file}: {} layers, hidden {}, {} tensors, tied embeddings: {tied}",
        params.block_count,
        params.hidden,
        mappings.len()
    );
    let pb = crate::progress::items(mappings.len() as u64, "importing".into());
    let mut tensors = Vec::with_capacity(mappings.len());
    let mut parameters = 0;
    for m in &mappings {
        pb.set_message(m.gguf.clone());
        let what = || format!("reading tensor {} from {file}", m.gguf);
        let t = content
            .tensor(&mut reader, &m.gguf, &Device::Cpu)
            .with_context(what)?
            .dequantize(&Device::Cpu)
            .with_context(what)?;
        if t.dims() != m.shape.as_slice() {
            bail!(
                "{file}: tensor {} has shape {:?}, expected {:?}",
                m.gguf,
                t.dims(),
                m.shape
            );
        }
        let t = match m.fix {
            Fix::None => t,
            Fix::Unpermute(heads) => rope::unpermute(&t, heads).with_context(what)?,
        };
        parameters += t.elem_count();
        tensors.push((m.hf.clone(), t.to_dtype(dtype)?));
        pb.inc(1);
    }
    pb.finish_and_clear();

    let write_json = |name: &str, value: &serde_json::Value| -> Result<()> {
        let path = out.path().join(name);
        let text = serde_json::to_string_pretty(value)? + "\n";
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write_json("config.json", &params.config_json(tied, dtype)?)?;
    write_json("generation_config.json", &params.generation_config_json())?;
    write_json("tokenizer_config.json", &tokenizer_config)?;
    let tok_path = out.path().join("tokenizer.json");
    tokenizer
        .save(&tok_path, false)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", tok_path.display()))?;
    let st_path = out.path().join("model.safetensors");
    let st_meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let views = tensors.iter().map(|(name, t)| (name.as_str(), t));
    safetensors::serialize_to_file(views, Some(st_meta), &st_path)
        .with_context(|| format!("writing {}", st_path.display()))?;

    out.commit()
        .with_context(|| format!("moving the import into {}", out_dir.display()))?;
    Ok(ImportReport {
        tensors: tensors.len(),
        parameters,
        architecture: arch.name().to_string(),
        out_dir: out_dir.to_path_buf(),
    })
}

/// The GGUF must hold exactly the expected tensors: a missing one would
/// break the model and an unknown one would be silently dropped.
fn check_tensor_set(content: &Content, mappings: &[names::Mapping]) -> Result<()> {
    let expected: HashSet<&str> = mappings.iter().map(|m| m.gguf.as_str()).collect();
    if let Some(m) = mappings
        .iter()
        .find(|m| !content.tensor_infos.contains_key(&m.gguf))
    {
        bail!("missing tensor {}", m.gguf);
    }
    let mut unknown: Vec<&str> = content
        .tensor_infos
        .keys()
        .map(String::as_str)
        .filter(|n| !expected.contains(n))
        .collect();
    unknown.sort_unstable();
    if let Some(first) = unknown.first() {
        bail!(
            "unexpected tensor {first} ({} unknown in total)",
            unknown.len()
        );
    }
    Ok(())
}
