//! `fetch-assets` and `import-gguf`: getting a model to work on.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::options::{DTypeArg, ModelArg};

#[derive(Args, Debug)]
pub struct FetchAssetsArgs {
    /// Where to keep them [default: $BITSTACK_HOME, else the user cache dir].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Which pinned model to fetch (the wiki texts come with each).
    #[arg(long, value_enum, default_value_t = ModelArg::default())]
    pub model: ModelArg,
}

#[derive(Args, Debug)]
pub struct ImportGgufArgs {
    /// The .gguf file (llama or qwen2 architecture).
    pub gguf: PathBuf,
    /// Where to write the model dir (must not exist or be empty).
    pub out_dir: PathBuf,
    /// Storage dtype of the safetensors weights.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
}

/// `bitstack fetch-assets`: prints where each asset is.
pub fn fetch(args: &FetchAssetsArgs) -> Result<()> {
    let a = bitstack_assets::fetch_model_assets(args.dir.as_deref(), args.model.into())?;
    println!("model:       {}", a.gguf.display());
    println!("eval text:   {}", a.eval_text.display());
    println!("calib text:  {}", a.calib_text.display());
    Ok(())
}

/// `bitstack import-gguf`.
pub fn import(args: &ImportGgufArgs) -> Result<()> {
    let r = bitstack_assets::import_gguf(&args.gguf, &args.out_dir, args.dtype.into())?;
    println!(
        "imported {} ({} tensors, {} parameters) into {}",
        r.architecture,
        r.tensors,
        r.parameters,
        r.out_dir.display()
    );
    Ok(())
}
