//! `bitstack ladder DIR --plot FILE.png`: measured rungs and the dense model
//! drawn into a real PNG, and the errors when there is nothing to draw.

#[path = "../../bitstack-quant/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bitstack_cli::plot::{
    Baseline, LadderPlot, BACKGROUND_RGB, BASELINE_RGB, DENSE_RGB, HEIGHT, SERIES_RGB, WIDTH,
};
use bitstack_quant::eval::sort::{sort_on_windows, SortMethod};
use bitstack_quant::format::order::{BlockOrder, Geometry, Rung};
use bitstack_quant::format::synthetic::SyntheticSpec;
use bitstack_quant::method::compress::compress;

/// A dense synthetic model, its BitStack checkpoint (4 blocks per linear)
/// and a text to score.
fn checkpoint(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let dense = root.join("dense");
    SyntheticSpec::default().write(&dense).unwrap();
    let text = root.join("text.txt");
    std::fs::write(&text, "a small text to calibrate and to score. ".repeat(60)).unwrap();
    let packed = root.join("tiny-bitstack");
    let opts = common::small_options(text.clone(), 3, 4);
    compress(&dense, &packed, &opts).unwrap();
    (dense, packed, text)
}

fn ladder_of(dir: &Path) -> Vec<Rung> {
    let cfg = bitstack_quant::format::config::ModelConfig::from_dir(dir).unwrap();
    let geometry = Geometry::from_config(&cfg).unwrap();
    BlockOrder::load(dir, &geometry).unwrap().ladder(&geometry)
}

fn bitstack(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitstack"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = bitstack(args);
    assert!(
        out.status.success(),
        "bitstack {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Width, height and RGB pixels of a PNG.
fn decode(bytes: &[u8]) -> (u32, u32, Vec<[u8; 3]>) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let pixels = buf[..info.buffer_size()]
        .chunks_exact(3)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    (info.width, info.height, pixels)
}

fn count(pixels: &[[u8; 3]], colour: [u8; 3]) -> usize {
    pixels.iter().filter(|p| **p == colour).count()
}

/// Dark pixels: text and the axes.
fn dark(pixels: &[[u8; 3]]) -> usize {
    pixels
        .iter()
        .filter(|p| p.iter().map(|&c| c as u32).sum::<u32>() < 3 * 100)
        .count()
}

#[test]
fn eval_records_then_ladder_plots_a_png() {
    let root = tempfile::tempdir().unwrap();
    let (dense, packed, text) = checkpoint(root.path());
    let (p, t) = (packed.to_str().unwrap(), text.to_str().unwrap());
    let ladder = ladder_of(&packed);
    assert_eq!(ladder.len(), 1 + 14 * 3);

    let eval = [
        "--text",
        t,
        "--windows",
        "3",
        "--seq-len",
        "32",
        "--batch",
        "2",
    ];
    for level in [0, 14, 30, ladder.len() - 1] {
        let budget = format!("{}B", ladder[level].total_bytes);
        let mut args = vec!["eval", p, "--budget", &budget, "--record", "--json"];
        args.extend(eval);
        ok(&args);
    }
    let mut args = vec![
        "eval",
        p,
        "--record-dense",
        dense.to_str().unwrap(),
        "--json",
    ];
    args.extend(eval);
    let dense_report: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    let dense_ppl = dense_report["ppl"].as_f64().unwrap();

    // The JSON ladder has the four measured rungs; the table names the dense model.
    let rungs: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&["ladder", p, "--json"])).unwrap();
    let measured: Vec<u64> = rungs
        .iter()
        .filter(|r| r.get("ppl").is_some())
        .map(|r| r["level"].as_u64().unwrap())
        .collect();
    assert_eq!(measured, vec![0, 14, 30, ladder.len() as u64 - 1]);
    let table = ok(&["ladder", p]);
    assert!(
        table.contains(&format!(
            "dense model {}: PPL {dense_ppl:.3}",
            dense.display()
        )),
        "{table}"
    );

    let png_path = root.path().join("ladder.png");
    let out = ok(&["ladder", p, "--plot", png_path.to_str().unwrap()]);
    assert!(
        out.contains(&format!("wrote {}", png_path.display())),
        "{out}"
    );
    let bytes = std::fs::read(&png_path).unwrap();
    let (w, h, pixels) = decode(&bytes);
    assert_eq!((w, h), (WIDTH, HEIGHT));
    let background = count(&pixels, BACKGROUND_RGB);
    let drawn = pixels.len() - background;
    assert!(
        drawn > pixels.len() / 100,
        "only {drawn} of {} pixels drawn",
        pixels.len()
    );
    // Four filled points of radius 5 and a line between them, and the dense line.
    assert!(count(&pixels, SERIES_RGB) > 4 * 50, "series pixels");
    assert!(count(&pixels, DENSE_RGB) > 200, "dense line pixels");
    assert!(dark(&pixels) > 2000, "text pixels");
    // Nothing else was left in the directory (the temporary file was renamed).
    let names: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");

    // --dense-ppl overrides the recorded dense model; the file is replaced.
    let out = bitstack(&[
        "ladder",
        p,
        "--json",
        "--plot",
        png_path.to_str().unwrap(),
        "--dense-ppl",
        "1e6",
    ]);
    assert!(out.status.success());
    // stdout stays pure JSON with --json.
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
    let (_, _, again) = decode(&std::fs::read(&png_path).unwrap());
    assert_ne!(again, pixels);
    assert_eq!(count(&again, BASELINE_RGB), 0);
    // --baseline draws a labelled marker at its bits per weight.
    let at = format!(
        "RTN w4={}:{}",
        ladder[20].bits_per_linear_weight,
        2.0 * dense_ppl
    );
    ok(&[
        "ladder",
        p,
        "--plot",
        png_path.to_str().unwrap(),
        "--baseline",
        &at,
    ]);
    let (_, _, marked) = decode(&std::fs::read(&png_path).unwrap());
    assert!(count(&marked, BASELINE_RGB) > 60, "baseline pixels");
    let out = bitstack(&[
        "ladder",
        p,
        "--plot",
        png_path.to_str().unwrap(),
        "--baseline",
        "RTN",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("LABEL=BITS:PPL"));

    // Sorting anew drops the rungs' perplexities (they belong to the old
    // order) but keeps the dense model's.
    let wins: Vec<Vec<u32>> = (0..2)
        .map(|w| (0..32).map(|i| (w * 37 + i * 11) % 300).collect())
        .collect();
    let (sorted, _) = sort_on_windows(
        &mut bitstack_quant::Checkpoint::open(&packed).unwrap(),
        SortMethod::Fast,
        &wins,
        2,
        &indicatif::ProgressBar::hidden(),
    )
    .unwrap();
    assert!(sorted.measured.is_empty());
    assert_eq!(sorted.dense.as_ref().map(|d| d.ppl), Some(dense_ppl));
    let cfg = bitstack_quant::format::config::ModelConfig::from_dir(&packed).unwrap();
    let reloaded = BlockOrder::load(&packed, &Geometry::from_config(&cfg).unwrap()).unwrap();
    assert_eq!(reloaded, sorted);
}

#[test]
fn plotting_without_measurements_or_to_a_bad_path_fails_cleanly() {
    let root = tempfile::tempdir().unwrap();
    let (_, packed, text) = checkpoint(root.path());
    let p = packed.to_str().unwrap();
    let png_path = root.path().join("ladder.png");

    let out = bitstack(&["ladder", p, "--plot", png_path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no rung of")
            && err.contains(&format!("bitstack eval {p} --budget SPEC --record")),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    assert!(!png_path.exists());

    // A rung measured: now an unwritable path is the error, and it is named.
    let budget = format!("{}B", ladder_of(&packed)[5].total_bytes);
    ok(&[
        "eval",
        p,
        "--budget",
        &budget,
        "--record",
        "--text",
        text.to_str().unwrap(),
        "--windows",
        "2",
        "--seq-len",
        "32",
    ]);
    let bad = root.path().join("no-such-dir").join("ladder.png");
    let out = bitstack(&["ladder", p, "--plot", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot write the plot to {}", bad.display())),
        "{err}"
    );
    assert!(!bad.exists());

    // --record-dense refuses a model that is not the dense original.
    let out = bitstack(&[
        "eval",
        p,
        "--record-dense",
        p,
        "--text",
        text.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a BitStack checkpoint"), "{err}");
}

/// A ladder shaped like SmolLM2's, with perplexities from 15 to 50000.
fn wide_ladder(measured: &[usize]) -> Vec<Rung> {
    let ppl = |level: usize| 15.0 * (50000.0f64 / 15.0).powf(1.0 - level as f64 / 15.0);
    (0..=15)
        .map(|level| {
            let linear_bytes = 23_000_000 * (level + 1);
            Rung {
                level,
                linear_bytes,
                total_bytes: linear_bytes + 113_000_000,
                bits_per_linear_weight: linear_bytes as f64 * 8.0 / 106_168_320.0,
                ppl: measured.contains(&level).then(|| ppl(level)),
            }
        })
        .collect()
}

fn render(ladder: &[Rung], dense: Option<f64>) -> Vec<[u8; 3]> {
    render_with(ladder, dense, Vec::new()).unwrap()
}

fn render_with(
    ladder: &[Rung],
    dense: Option<f64>,
    baselines: Vec<Baseline>,
) -> anyhow::Result<Vec<[u8; 3]>> {
    let plot = LadderPlot {
        title: "smollm2-bitstack: perplexity against resident memory".into(),
        subtitle: Some("perplexity on wiki-eval.txt, 64 windows; order: fast".into()),
        ladder,
        series_label: "BitStack, measured rungs".into(),
        dense_ppl: dense,
        dense_label: "dense model: PPL 14.92".into(),
        baselines,
    };
    let (w, h, pixels) = decode(&plot.render_png()?);
    assert_eq!((w, h), (WIDTH, HEIGHT));
    Ok(pixels)
}

#[test]
fn baselines_are_drawn_where_their_bits_fall_and_bad_ones_refused() {
    let ladder = wide_ladder(&[0, 5, 10, 15]);
    let none = render(&ladder, Some(14.92));
    assert_eq!(count(&none, BASELINE_RGB), 0);
    let rtn = |bits: f64, ppl: f64| Baseline {
        label: "RTN w4".into(),
        bits,
        ppl,
    };
    let one = render_with(&ladder, Some(14.92), vec![rtn(4.27, 20.1)]).unwrap();
    let two = render_with(&ladder, Some(14.92), vec![rtn(4.27, 20.1), rtn(3.27, 81.8)]).unwrap();
    // A filled triangle of size 7 and its label, then twice that.
    let (a, b) = (count(&one, BASELINE_RGB), count(&two, BASELINE_RGB));
    assert!(a > 60, "{a} baseline pixels");
    assert!(b > a + 40, "{a} → {b} baseline pixels");
    // Beyond the ladder's bits the memory axis widens to hold it.
    assert!(render_with(&ladder, None, vec![rtn(40.0, 15.0)]).is_ok());
    for bad in [rtn(0.0, 20.0), rtn(4.0, f64::NAN), rtn(4.0, 1e31)] {
        let e = render_with(&ladder, None, vec![bad]).unwrap_err();
        assert!(e.to_string().contains("baseline `RTN w4`"), "{e}");
    }
}

#[test]
fn more_measured_rungs_draw_more_and_the_dense_line_only_when_given() {
    let few = render(&wide_ladder(&[0, 15]), None);
    let many = render(&wide_ladder(&[0, 1, 2, 3, 5, 8, 11, 15]), None);
    let with_dense = render(&wide_ladder(&[0, 1, 2, 3, 5, 8, 11, 15]), Some(14.92));
    assert_eq!(count(&few, DENSE_RGB), 0);
    assert_eq!(count(&many, DENSE_RGB), 0);
    // The dense line crosses the whole plot area: most of the picture's width,
    // dashed.
    assert!(
        count(&with_dense, DENSE_RGB) > WIDTH as usize / 2,
        "dense line"
    );
    // Six more points: about 80 pixels each, less the line through them.
    let (a, b) = (count(&few, SERIES_RGB), count(&many, SERIES_RGB));
    assert!(b > a + 6 * 40, "{a} → {b} series pixels");
    // Rows of the title hold text.
    let title_rows = &many[..WIDTH as usize * 36];
    assert!(dark(title_rows) > 300, "title text");
}
