//! `bitstack bench`'s text table.

use super::measure::BenchRow;

/// The rows as an aligned text table, one line per combination.
pub fn format_table(rows: &[BenchRow]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>11} {:>7} {:>6} {:>3} {:>5} {:>6} {:>10} {:>12} {:>12} {:>10} {:>9} {:>9} {:>9}",
        "shape",
        "layout",
        "count",
        "k",
        "rows",
        "bpw",
        "ours ms",
        "dense f32 ms",
        "dense f16 ms",
        "Q4K ms",
        "ours/f32",
        "ours/f16",
        "ours/Q4K"
    );
    for r in rows {
        let q4k = r.q4k_ms.map_or("-".to_string(), fmt_ms);
        let q4k_ratio = r
            .q4k_ms
            .map_or("-".to_string(), |q| format!("{:.2}", r.ours_ms / q));
        let _ = writeln!(
            s,
            "{:>11} {:>7} {:>6} {:>3} {:>5} {:>6.3} {:>10} {:>12} {:>12} {:>10} {:>9.2} {:>9.2} {:>9}",
            format!("{}x{}", r.m, r.n),
            r.layout.name(),
            r.blocks,
            r.k.map_or("-".to_string(), |k| k.to_string()),
            r.rows,
            r.bpw,
            fmt_ms(r.ours_ms),
            fmt_ms(r.dense_f32_ms),
            fmt_ms(r.dense_f16_ms),
            q4k,
            r.ours_ms / r.dense_f32_ms,
            r.ours_ms / r.dense_f16_ms,
            q4k_ratio
        );
    }
    s
}

/// Milliseconds with three significant decimals where they matter.
fn fmt_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.1}")
    } else if ms >= 1.0 {
        format!("{ms:.3}")
    } else {
        format!("{ms:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::measure::{stack_bits_per_weight, Layout};

    #[test]
    fn the_table_prints_dashes_without_q4k() {
        let row = BenchRow {
            m: 33,
            n: 40,
            layout: Layout::Blocks,
            blocks: 2,
            k: Some(4),
            rows: 1,
            bpw: stack_bits_per_weight(33, 40, 4, 2),
            ours_ms: 2.0,
            dense_f32_ms: 1.0,
            dense_f16_ms: 4.0,
            q4k_ms: None,
        };
        let t = format_table(&[row]);
        let line = t.lines().nth(1).unwrap();
        assert!(line.trim_start().starts_with("33x40"), "{t}");
        assert!(line.contains(" 2.00 ") && line.contains(" 0.50 "), "{t}");
        assert!(line.trim_end().ends_with('-'), "{t}");
    }
}
