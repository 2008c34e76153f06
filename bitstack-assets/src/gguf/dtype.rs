//! GGML tensor types: which ones the importer dequantizes, and their names
//! for error messages.

use anyhow::{bail, Result};

/// `(id, name, supported)` for every type llama.cpp has defined. Supported
/// are those candle dequantizes; candle reads Q8_1 but cannot dequantize it.
const TYPES: &[(u32, &str, bool)] = &[
    (0, "F32", true),
    (1, "F16", true),
    (2, "Q4_0", true),
    (3, "Q4_1", true),
    (6, "Q5_0", true),
    (7, "Q5_1", true),
    (8, "Q8_0", true),
    (9, "Q8_1", false),
    (10, "Q2_K", true),
    (11, "Q3_K", true),
    (12, "Q4_K", true),
    (13, "Q5_K", true),
    (14, "Q6_K", true),
    (15, "Q8_K", true),
    (16, "IQ2_XXS", false),
    (17, "IQ2_XS", false),
    (18, "IQ3_XXS", false),
    (19, "IQ1_S", false),
    (20, "IQ4_NL", false),
    (21, "IQ3_S", false),
    (22, "IQ2_S", false),
    (23, "IQ4_XS", false),
    (24, "I8", false),
    (25, "I16", false),
    (26, "I32", false),
    (27, "I64", false),
    (28, "F64", false),
    (29, "IQ1_M", false),
    (30, "BF16", true),
    (34, "TQ1_0", false),
    (35, "TQ2_0", false),
    (39, "MXFP4", false),
];

/// Ok if the importer can dequantize type `ty`; else an error naming the
/// tensor, the type and the supported types.
pub(crate) fn check(tensor: &str, ty: u32) -> Result<()> {
    let known = TYPES.iter().find(|t| t.0 == ty);
    if let Some((_, _, true)) = known {
        return Ok(());
    }
    let name = known.map_or_else(
        || format!("unknown type {ty}"),
        |t| format!("{} ({ty})", t.1),
    );
    let supported: Vec<&str> = TYPES.iter().filter(|t| t.2).map(|t| t.1).collect();
    bail!(
        "tensor {tensor} has GGML type {name}, which the importer does not handle \
         (supported: {})",
        supported.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_tensor_and_type() {
        assert!(check("a", 12).is_ok());
        let e = check("blk.0.ffn_up.weight", 16).unwrap_err().to_string();
        assert!(
            e.starts_with("tensor blk.0.ffn_up.weight has GGML type IQ2_XXS (16)"),
            "{e}"
        );
        assert!(e.contains("Q4_K") && !e.contains("Q8_1,"), "{e}");
        let e = check("t", 9).unwrap_err().to_string();
        assert!(e.contains("Q8_1 (9)"), "{e}");
        let e = check("t", 1000).unwrap_err().to_string();
        assert!(e.contains("unknown type 1000"), "{e}");
    }
}
