//! The flags with a fixed set of values, as clap `ValueEnum`s.
//!
//! Clap checks the spelling (a wrong one exits with status 2 and lists the
//! accepted values), and each enum becomes the library's own type here and
//! nowhere else, by exhaustive matches: a value added on either side fails to
//! compile until it is mapped.

use std::path::PathBuf;

use bitstack_assets::Model;
use bitstack_quant::eval::sort::SortMethod;
use bitstack_quant::format::grid::GridCoding;
use bitstack_quant::method::compress::{CompressOptions, FeedbackOptions};
use bitstack_quant::method::decompose::Refit;
use bitstack_quant::method::svd::SvdMethod;
use bitstack_quant::DenseDtype;
use candle_core::DType;
use clap::ValueEnum;

/// `fetch-assets --model`, `demo --model`: which pinned model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ModelArg {
    /// SmolLM2-135M-Instruct (llama, Q4_1 GGUF in one wheel).
    #[default]
    #[value(name = "smollm2-135m")]
    Smollm2,
    /// Qwen2.5-Coder-0.5B-Instruct (qwen2, Q4_K_M GGUF in six wheels).
    #[value(name = "qwen2.5-coder-0.5b")]
    QwenCoder,
}

impl From<ModelArg> for Model {
    fn from(m: ModelArg) -> Self {
        match m {
            ModelArg::Smollm2 => Model::SmolLm2,
            ModelArg::QwenCoder => Model::Qwen25Coder,
        }
    }
}

/// `import-gguf --dtype`: storage dtype of the safetensors weights;
/// `compress --dense-dtype`: storage dtype of the dense parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

impl From<DTypeArg> for DenseDtype {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => DenseDtype::F32,
            DTypeArg::F16 => DenseDtype::F16,
            DTypeArg::Bf16 => DenseDtype::Bf16,
        }
    }
}

impl From<DenseDtype> for DTypeArg {
    fn from(d: DenseDtype) -> Self {
        match d {
            DenseDtype::F32 => DTypeArg::F32,
            DenseDtype::F16 => DTypeArg::F16,
            DenseDtype::Bf16 => DTypeArg::Bf16,
        }
    }
}

/// `compress --svd`: the top-k SVD of the decomposition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SvdArg {
    Exact,
    Randomized,
}

impl From<SvdArg> for SvdMethod {
    fn from(s: SvdArg) -> Self {
        match s {
            SvdArg::Exact => SvdMethod::Exact,
            // Seed 0, as the tool always used: compressing twice gives the same blocks.
            SvdArg::Randomized => SvdMethod::randomized(0),
        }
    }
}

/// `compress --signs`: how each block's signs are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SignsArg {
    Avd,
    Feedback,
}

impl SignsArg {
    /// The library's `CompressOptions::feedback`: `None` is the paper's AVD
    /// signs, so the feedback settings only count with `feedback`.
    pub fn feedback(self, settings: FeedbackOptions) -> Option<FeedbackOptions> {
        match self {
            SignsArg::Avd => None,
            SignsArg::Feedback => Some(settings),
        }
    }
}

/// `compress --refit`: how u·vt follow the signs chosen by feedback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RefitArg {
    None,
    Svd,
    Weighted,
}

impl From<RefitArg> for Refit {
    fn from(r: RefitArg) -> Self {
        match r {
            RefitArg::None => Refit::None,
            RefitArg::Svd => Refit::Svd,
            RefitArg::Weighted => Refit::Weighted,
        }
    }
}

/// `sort --method`: how one level of the block order is ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SortMethodArg {
    Fast,
    Exact,
    Local,
}

impl From<SortMethodArg> for SortMethod {
    fn from(m: SortMethodArg) -> Self {
        match m {
            SortMethodArg::Fast => SortMethod::Fast,
            SortMethodArg::Exact => SortMethod::Exact,
            SortMethodArg::Local => SortMethod::Local,
        }
    }
}

/// Every value each command line accepts reaches the library as the variant
/// it names: parsed by the real `Cli`, mapped by the code the commands run.
#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use bitstack_quant::eval::sort::SortOptions;
    use bitstack_quant::format::rotation::RotationConfig;
    use bitstack_quant::method::compress::{CompressOptions, Rotation};
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Command {
        let argv = std::iter::once("bitstack").chain(args.iter().copied());
        match Cli::try_parse_from(argv) {
            Ok(cli) => cli.command,
            Err(e) => panic!("bitstack {args:?}: {e}"),
        }
    }

    fn compress_result(extra: &[&str]) -> anyhow::Result<CompressOptions> {
        let mut args = vec!["compress", "model", "out"];
        args.extend(extra);
        match parse(&args) {
            Command::Compress(c) => c.options(PathBuf::from("calib.txt")),
            _ => panic!("not compress"),
        }
    }

    fn compress(extra: &[&str]) -> CompressOptions {
        compress_result(extra).unwrap_or_else(|e| panic!("compress {extra:?}: {e}"))
    }

    fn sort(extra: &[&str]) -> SortOptions {
        let mut args = vec!["sort", "dir"];
        args.extend(extra);
        match parse(&args) {
            Command::Sort(s) => s.options(PathBuf::from("calib.txt"), candle_core::Device::Cpu),
            _ => panic!("not sort"),
        }
    }

    #[test]
    fn every_dtype_reaches_import_gguf() {
        for (name, want) in [
            ("f32", DType::F32),
            ("f16", DType::F16),
            ("bf16", DType::BF16),
        ] {
            match parse(&["import-gguf", "a.gguf", "out", "--dtype", name]) {
                Command::ImportGguf(a) => assert_eq!(DType::from(a.dtype), want, "{name}"),
                _ => panic!("not import-gguf"),
            }
        }
        match parse(&["import-gguf", "a.gguf", "out"]) {
            Command::ImportGguf(a) => assert_eq!(DType::from(a.dtype), DType::F32, "default"),
            _ => panic!("not import-gguf"),
        }
    }

    #[test]
    fn every_dense_dtype_reaches_compress() {
        for (name, want) in [
            ("f32", DenseDtype::F32),
            ("f16", DenseDtype::F16),
            ("bf16", DenseDtype::Bf16),
        ] {
            assert_eq!(
                compress(&["--dense-dtype", name]).dense_dtype,
                want,
                "{name}"
            );
        }
        assert_eq!(compress(&[]).dense_dtype, DenseDtype::default(), "default");
        assert_eq!(DenseDtype::default(), DenseDtype::F16);
    }

    #[test]
    fn a_misspelt_dense_dtype_is_a_usage_error() {
        let argv = [
            "bitstack",
            "compress",
            "model",
            "out",
            "--dense-dtype",
            "fp16",
        ];
        let Err(e) = Cli::try_parse_from(argv) else {
            panic!("fp16 is not a value");
        };
        assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue);
        let text = e.to_string();
        assert!(text.contains("fp16") && text.contains("bf16"), "{text}");
    }

    #[test]
    fn every_svd_method_reaches_compress() {
        assert_eq!(compress(&["--svd", "exact"]).svd, SvdMethod::Exact);
        assert_eq!(
            compress(&["--svd", "randomized"]).svd,
            SvdMethod::randomized(0)
        );
        assert_eq!(compress(&[]).svd, SvdMethod::randomized(0), "default");
    }

    #[test]
    fn every_signs_choice_reaches_compress() {
        assert!(compress(&["--signs", "avd"]).feedback.is_none());
        let f = compress(&["--signs", "feedback", "--damp", "0.5", "--rounds", "3"])
            .feedback
            .expect("--signs feedback has feedback options");
        assert_eq!((f.damp, f.rounds), (0.5, 3));
        let f = compress(&[]).feedback.expect("feedback is the default");
        assert_eq!((f.damp, f.refit, f.rounds), (0.01, Refit::Weighted, 1));
    }

    #[test]
    fn every_refit_reaches_compress() {
        for (name, want) in [
            ("none", Refit::None),
            ("svd", Refit::Svd),
            ("weighted", Refit::Weighted),
        ] {
            let f = compress(&["--signs", "feedback", "--refit", name])
                .feedback
                .expect("feedback options");
            assert_eq!(f.refit, want, "{name}");
        }
    }

    #[test]
    fn every_layout_reaches_compress_with_its_counts() {
        let parts = |o: &CompressOptions| (o.niter, o.grid.map_or(0, |g| g.planes));
        assert_eq!(parts(&compress(&[])), (0, 6), "default: planes");
        assert_eq!(parts(&compress(&["--layout", "planes"])), (0, 6));
        assert_eq!(parts(&compress(&["--planes", "4"])), (0, 4));
        // The spelling of earlier releases still means planes alone.
        assert_eq!(parts(&compress(&["--niter", "0", "--planes", "5"])), (0, 5));
        assert_eq!(parts(&compress(&["--layout", "blocks"])), (8, 0));
        assert_eq!(
            parts(&compress(&["--layout", "blocks", "--niter", "3"])),
            (3, 0)
        );
        assert_eq!(parts(&compress(&["--layout", "blocks+planes"])), (1, 6));
        assert_eq!(
            parts(&compress(&[
                "--layout",
                "blocks+planes",
                "--niter",
                "1",
                "--planes",
                "3"
            ])),
            (1, 3)
        );
        // The library's defaults are the CLI's.
        let lib = CompressOptions::recommended(PathBuf::from("calib.txt"));
        assert_eq!(parts(&lib), parts(&compress(&[])));
        assert_eq!(lib.grid, compress(&[]).grid);
        assert_eq!(lib.rotation, compress(&[]).rotation);
        assert_eq!(lib.rotation, Rotation::Widest);
        assert_eq!(lib.plane_feedback, compress(&[]).plane_feedback);
        assert_eq!(lib.plane_feedback, None);
        assert_eq!(compress(&["--plane-feedback", "0"]).plane_feedback, None);
        assert_eq!(compress(&["--plane-feedback", "2"]).plane_feedback, Some(2));
        assert_eq!(compress(&["--rotate", "0"]).rotation, Rotation::None);
        assert_eq!(compress(&["--layout", "blocks"]).rotation, Rotation::None);
        assert_eq!(
            compress(&["--rotate", "128"]).rotation,
            Rotation::Fixed(RotationConfig::new(128))
        );
        let lib = CompressOptions::avd_blocks(PathBuf::from("calib.txt"));
        assert_eq!(parts(&lib), parts(&compress(&["--layout", "blocks"])));
        let lib = CompressOptions::blocks_then_planes(PathBuf::from("calib.txt"));
        let cli = compress(&["--layout", "blocks+planes"]);
        assert_eq!(parts(&lib), parts(&cli));
        assert_eq!((lib.k, cli.k), (4, 4));
        assert_eq!(lib.rotation, cli.rotation);
        assert_eq!(cli.rotation, Rotation::Widest);
        assert_eq!(lib.grid, cli.grid);
        let damp = |o: &CompressOptions| o.feedback.map(|f| f.damp);
        assert_eq!(damp(&lib), damp(&cli));
        assert_eq!(damp(&cli), Some(10.0));
        assert_eq!(damp(&compress(&["--layout", "blocks"])), Some(0.01));
        assert_eq!(compress(&["--layout", "blocks"]).k, 4);
        // Given flags win over the layout's defaults.
        let given = compress(&["--layout", "blocks+planes", "--k", "3", "--damp", "0.1"]);
        assert_eq!((given.k, damp(&given)), (3, Some(0.1)));
        // The scale exponent follows the layout.
        assert_eq!(compress(&[]).scale_power(), 0.5);
        assert_eq!(cli.scale_power(), 0.5);
        assert_eq!(compress(&["--layout", "blocks"]).scale_power(), 1.0);
    }

    #[test]
    fn a_count_the_layout_has_no_part_for_is_refused() {
        for (extra, needle) in [
            (&["--niter", "8"][..], "--niter 8 counts AVD blocks"),
            (
                &["--layout", "blocks", "--planes", "2"],
                "--planes 2 counts grid planes",
            ),
            (&["--planes", "0"], "--planes 0"),
            (
                &["--layout", "blocks+planes", "--planes", "0"],
                "--planes 0",
            ),
            (&["--layout", "blocks", "--niter", "0"], "--niter 0"),
            (&["--layout", "blocks+planes", "--niter", "0"], "--niter 0"),
        ] {
            let e = compress_result(extra).expect_err(&format!("{extra:?} accepted"));
            assert!(e.to_string().contains(needle), "{extra:?}: {e}");
        }
    }

    #[test]
    fn every_sort_method_reaches_sort() {
        for (name, want) in [
            ("fast", SortMethod::Fast),
            ("exact", SortMethod::Exact),
            ("local", SortMethod::Local),
        ] {
            assert_eq!(sort(&["--method", name]).method, want, "{name}");
        }
        assert_eq!(sort(&[]).method, SortMethod::Fast, "default");
    }

    /// The spellings, in the order clap lists them: the tests above map each
    /// of these, so a value added to an enum fails here until it is tested.
    #[test]
    fn the_tests_above_cover_every_value() {
        fn names<E: ValueEnum>() -> Vec<String> {
            E::value_variants()
                .iter()
                .map(|v| {
                    v.to_possible_value()
                        .expect("no skipped values")
                        .get_name()
                        .to_string()
                })
                .collect()
        }
        assert_eq!(names::<DTypeArg>(), ["f32", "f16", "bf16"]);
        assert_eq!(names::<SvdArg>(), ["exact", "randomized"]);
        assert_eq!(names::<SignsArg>(), ["avd", "feedback"]);
        assert_eq!(names::<RefitArg>(), ["none", "svd", "weighted"]);
        assert_eq!(names::<SortMethodArg>(), ["fast", "exact", "local"]);
        assert_eq!(names::<GridCodingArg>(), ["int8", "int8-scaled", "f16"]);
        assert_eq!(names::<LayoutArg>(), ["planes", "blocks", "blocks+planes"]);
    }
}

/// `compress --layout`: what each linear's stack is made of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LayoutArg {
    /// Nested bit planes on a uniform grid per row and group of input
    /// columns, inputs rotated (--planes, 6 by default; format version 5
    /// with the default --grid-coding): from 2.5 bits per weight up the
    /// better layout, on the calibration's kind of text and off it
    /// (SmolLM2 at 4 bits: 1.193× dense PPL, where RTN w4 needs 4.27 bits
    /// for 1.35×). Below 2.3 bits it leaves some linears a single plane.
    #[default]
    Planes,
    /// AVD blocks: signs times a rank-k product (--niter, 8 by default;
    /// --k, --signs, --refit), inputs unrotated: the paper's layout, fitted
    /// to the calibration's kind of text (SmolLM2 at 2.0 bits: 1846 on
    /// wiki, 1.6e5 on Rust code).
    Blocks,
    /// --niter AVD blocks (1 of rank 4 by default, signs chosen with
    /// damped feedback), then --planes grid planes of what they leave,
    /// inputs rotated: the layout to try below 2.3 bits per weight, with
    /// --calib text like yours, as its block follows the calibration
    /// (SmolLM2 at 2.0 bits: 1073 on wiki and 2504 on Rust code, against
    /// the planes' 9.7e4 and 2.8e5; Qwen2.5-Coder, calibrated on wiki: 298
    /// and 399, against 1926 and 959); from 2.3 bits up the planes are
    /// better off the calibration's kind of text.
    #[value(name = "blocks+planes")]
    BlocksThenPlanes,
}

impl LayoutArg {
    /// The library's preset for this layout, calibrating on `calib_text`:
    /// what the flags left out default to.
    pub fn preset(self, calib_text: PathBuf) -> CompressOptions {
        match self {
            Self::Planes => CompressOptions::recommended(calib_text),
            Self::Blocks => CompressOptions::avd_blocks(calib_text),
            Self::BlocksThenPlanes => CompressOptions::blocks_then_planes(calib_text),
        }
    }
}

/// `compress --grid-coding`: how the grid planes store each (row, group)'s
/// center and half-range and each outlier's value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum GridCodingArg {
    /// 8-bit codes under three f16 steps per row (format version 3, 4
    /// when rotated): at groups of 128, 0.25 bits per weight of grid plus
    /// 48/n (n input columns), measured as good as f16.
    Int8,
    /// The 8-bit codes and a prefix scale per plane count (format version
    /// 5, 24 bytes more per linear), fitted to each linear's outputs on the
    /// calibration inputs, so that short prefixes do not put their outer
    /// levels too far out: lower perplexity than int8 at every budget
    /// measured on both test models (SmolLM2 at 2.5 / 3.0 bits per weight:
    /// 90 / 38.5 against 121 / 42.0).
    #[default]
    Int8Scaled,
    /// An f16 each (format version 2, for readers older than version 3):
    /// 0.44 bits per weight at groups of 128.
    F16,
}

impl From<GridCodingArg> for GridCoding {
    fn from(r: GridCodingArg) -> Self {
        match r {
            GridCodingArg::Int8Scaled => GridCoding::Int8Scaled,
            GridCodingArg::Int8 => GridCoding::Int8,
            GridCodingArg::F16 => GridCoding::F16,
        }
    }
}
