//! Resolving a model argument: a local dir, or a Hugging Face model id.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Files a model dir needs, fetched for a Hub model id.
const MODEL_FILES: &[&str] = &["config.json", "tokenizer.json"];

/// What a model argument names.
#[derive(Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// An existing local directory.
    Local(PathBuf),
    /// A Hub repository id (`owner/name`), with an optional revision (`owner/name@rev`).
    Hub {
        repo: String,
        revision: Option<String>,
    },
}

/// Decides whether `arg` is a local dir or a Hub id, without network access.
pub fn parse_model_arg(arg: &str) -> Result<ModelSource> {
    let path = Path::new(arg);
    if path.is_dir() {
        return Ok(ModelSource::Local(path.to_path_buf()));
    }
    let (repo, revision) = match arg.split_once('@') {
        Some((r, rev)) if !rev.is_empty() => (r, Some(rev.to_string())),
        _ => (arg, None),
    };
    let parts: Vec<&str> = repo.split('/').collect();
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if parts.len() == 2 && parts.iter().all(|p| valid(p)) && !arg.starts_with('.') {
        return Ok(ModelSource::Hub {
            repo: repo.to_string(),
            revision,
        });
    }
    bail!("`{arg}` is neither a model directory nor a Hugging Face model id (owner/name)")
}

/// The Hub cache directory: `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(home).join("hub"));
    }
    dirs::home_dir().map(|h| h.join(".cache").join("huggingface").join("hub"))
}

/// The token for gated models: `$HF_TOKEN`, else `$HF_HOME/token`.
pub fn hub_token() -> Option<String> {
    if let Ok(t) = std::env::var("HF_TOKEN") {
        if !t.trim().is_empty() {
            return Some(t.trim().to_string());
        }
    }
    let home = std::env::var_os("HF_HOME")
        .map(PathBuf::from)
        .or_else(|| dirs::home_dir().map(|h| h.join(".cache").join("huggingface")))?;
    std::fs::read_to_string(home.join("token"))
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// A local model dir for `arg`, downloading a Hub model into the Hub cache
/// when needed (config, tokenizer, safetensors index and shards).
pub fn resolve_model(arg: &str) -> Result<PathBuf> {
    match parse_model_arg(arg)? {
        ModelSource::Local(p) => Ok(p),
        ModelSource::Hub { repo, revision } => download(&repo, revision),
    }
}

fn download(repo: &str, revision: Option<String>) -> Result<PathBuf> {
    use hf_hub::{api::sync::ApiBuilder, Repo, RepoType};
    let mut builder = ApiBuilder::new()
        .with_progress(true)
        .with_token(hub_token());
    if let Some(cache) = hub_cache_dir() {
        builder = builder.with_cache_dir(cache);
    }
    let api = builder
        .build()
        .context("cannot set up the Hugging Face Hub client")?;
    let repo = match revision {
        Some(rev) => Repo::with_revision(repo.to_string(), RepoType::Model, rev),
        None => Repo::model(repo.to_string()),
    };
    let api = api.repo(repo.clone());
    let mut dir = None;
    for f in MODEL_FILES {
        let p = api
            .get(f)
            .with_context(|| format!("cannot download {f} of {}", repo.url()))?;
        dir = p.parent().map(Path::to_path_buf);
    }
    match api.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index)?;
            let json: serde_json::Value = serde_json::from_str(&text)?;
            let mut shards: Vec<&str> = json["weight_map"]
                .as_object()
                .context("model.safetensors.index.json has no weight_map")?
                .values()
                .filter_map(|v| v.as_str())
                .collect();
            shards.sort();
            shards.dedup();
            for s in shards {
                api.get(s)
                    .with_context(|| format!("cannot download {s} of {}", repo.url()))?;
            }
        }
        Err(_) => {
            api.get("model.safetensors")
                .with_context(|| format!("cannot download model.safetensors of {}", repo.url()))?;
        }
    }
    for optional in ["generation_config.json", "tokenizer_config.json"] {
        let _ = api.get(optional);
    }
    dir.context("the Hub returned no files")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_dirs_and_hub_ids() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().to_str().unwrap();
        assert_eq!(
            parse_model_arg(p).unwrap(),
            ModelSource::Local(d.path().to_path_buf())
        );
        assert_eq!(
            parse_model_arg("HuggingFaceTB/SmolLM2-135M").unwrap(),
            ModelSource::Hub {
                repo: "HuggingFaceTB/SmolLM2-135M".into(),
                revision: None
            }
        );
        assert_eq!(
            parse_model_arg("meta-llama/Llama-3.1-8B@main").unwrap(),
            ModelSource::Hub {
                repo: "meta-llama/Llama-3.1-8B".into(),
                revision: Some("main".into())
            }
        );
        for bad in [
            "./missing/dir",
            "no-slash",
            "a/b/c",
            "/abs/missing",
            "a b/c",
        ] {
            assert!(parse_model_arg(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hf_home_and_token_are_honoured() {
        // Environment is process-global: keep every env-dependent assertion in this one test.
        let d = tempfile::tempdir().unwrap();
        std::env::set_var("HF_HOME", d.path());
        std::env::remove_var("HF_TOKEN");
        assert_eq!(hub_cache_dir().unwrap(), d.path().join("hub"));
        assert_eq!(hub_token(), None);
        std::fs::write(d.path().join("token"), "hf_file\n").unwrap();
        assert_eq!(hub_token().as_deref(), Some("hf_file"));
        std::env::set_var("HF_TOKEN", "hf_env");
        assert_eq!(hub_token().as_deref(), Some("hf_env"));
        std::env::remove_var("HF_TOKEN");
        std::env::remove_var("HF_HOME");
    }
}
