//! The runtime control handle: resizes follow the order, refuse what they
//! must, never tear a forward and never deadlock.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bitstack_quant::format::config::ModelConfig;
use bitstack_quant::format::order::{BlockOrder, Geometry};
use bitstack_quant::format::synthetic::SyntheticSpec;
use bitstack_quant::method::compress::compress;
use bitstack_quant::runtime::elastic::{BitStackHandle, ResizeError};
use bitstack_quant::runtime::model::Llama;
use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// A compressed synthetic model with 4 blocks per linear and a shuffled
/// (valid) block order, so that following the order is not the same as
/// going level by level.
fn compressed(root: &Path) -> PathBuf {
    let dense = root.join("dense");
    SyntheticSpec::default().write(&dense).unwrap();
    let calib = root.join("calib.txt");
    std::fs::write(&calib, "resizing a model while it runs. ".repeat(40)).unwrap();
    let out = root.join("packed");
    compress(&dense, &out, &common::small_options(calib, 3, 4)).unwrap();

    let cfg = ModelConfig::from_dir(&out).unwrap();
    let geometry = Geometry::from_config(&cfg).unwrap();
    let mut order = BlockOrder::round_robin(&geometry);
    let mut rng = StdRng::seed_from_u64(3);
    // Random interleaving that keeps each linear's blocks in their order.
    let mut queues: Vec<Vec<(String, usize)>> = geometry
        .linears
        .iter()
        .map(|l| (1..l.stored).rev().map(|b| (l.name.clone(), b)).collect())
        .collect();
    order.order.clear();
    while queues.iter().any(|q| !q.is_empty()) {
        let open: Vec<usize> = (0..queues.len())
            .filter(|&i| !queues[i].is_empty())
            .collect();
        let pick = open[rng.random_range(0..open.len())];
        order.order.push(queues[pick].pop().unwrap());
    }
    order.method = "test-shuffle".into();
    order.save(&out, &geometry).unwrap();
    out
}

fn tokens() -> Tensor {
    Tensor::new(&[[5u32, 77, 150, 9, 201, 33, 2]], &Device::Cpu).unwrap()
}

fn logits_of(model: &Llama) -> Vec<f32> {
    common::logits(model, &tokens())
}

#[test]
fn every_level_equals_a_fresh_load_of_that_level() {
    let root = tempfile::tempdir().unwrap();
    let dir = compressed(root.path());
    let handle = BitStackHandle::open(&dir, None, &Device::Cpu).unwrap();
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let geometry = Geometry::from_config(&cfg).unwrap();
    let order = BlockOrder::load(&dir, &geometry).unwrap();
    let ladder = order.ladder(&geometry);
    assert_eq!(handle.max_level(), 14 * 3);
    assert_eq!(handle.level(), handle.max_level());
    assert_eq!(
        handle.max_bytes(),
        ladder.last().unwrap().total_bytes as u64
    );
    assert_eq!(handle.floor_bytes(), ladder[0].total_bytes as u64);

    // Down and up again through levels out of step with whole layers.
    for level in [41, 30, 17, 3, 0, 1, 22, 42, 11] {
        let before = handle.level();
        let r = handle.set_level(level).unwrap();
        assert_eq!((r.from_level, r.to_level), (before, level));
        assert_eq!(r.blocks_added, level.saturating_sub(before));
        assert_eq!(r.blocks_dropped, before.saturating_sub(level));
        let snap = handle.snapshot();
        assert_eq!(snap.level, level);
        assert_eq!(handle.resident_bytes(), ladder[level].total_bytes as u64);
        assert_eq!(snap.resident_bytes() as u64, handle.resident_bytes());
        let fresh = Llama::load(&dir, &order.counts_at(&geometry, level), &Device::Cpu).unwrap();
        assert_eq!(
            logits_of(&snap),
            logits_of(&fresh),
            "level {level} reached from {before}"
        );
    }
}

#[test]
fn budgets_below_the_floor_are_refused_and_above_the_top_are_clamped() {
    let root = tempfile::tempdir().unwrap();
    let dir = compressed(root.path());
    let floor = {
        let h = BitStackHandle::open(&dir, None, &Device::Cpu).unwrap();
        h.floor_bytes()
    };
    // Opening below the floor is the same error.
    let e = BitStackHandle::open(&dir, Some(floor - 1), &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("below the floor"), "{e}");

    let handle = BitStackHandle::open(&dir, Some(floor + 10_000), &Device::Cpu).unwrap();
    let level = handle.level();
    let epoch = handle.snapshot().epoch;
    assert!(level > 0 && level < handle.max_level());
    let budget = handle.budget();
    for refused in [
        handle.set_budget(0),
        handle.set_budget(floor - 1),
        handle.shrink_by(u64::MAX),
        handle.shrink_by(handle.resident_bytes() - floor + 1),
    ] {
        match refused {
            Err(ResizeError::BelowFloor {
                floor: f,
                requested,
            }) => {
                assert_eq!(f, floor);
                assert!(requested < floor);
                let msg = refused.unwrap_err().to_string();
                assert!(msg.contains(&floor.to_string()) && msg.contains("nothing was changed"));
            }
            other => panic!("expected a below-floor error, got {other:?}"),
        }
        assert_eq!(
            (handle.level(), handle.snapshot().epoch, handle.budget()),
            (level, epoch, budget)
        );
    }

    // Nothing to do: no new snapshot.
    let r = handle.shrink_by(0).unwrap();
    assert_eq!((r.to_level, r.epoch), (level, epoch));
    // One byte more frees a whole block: shrink frees at least what is asked.
    let r = handle.shrink_by(1).unwrap();
    assert_eq!(r.blocks_dropped, 1);
    assert!(r.bytes_freed() >= 1);
    // One byte is less than any block: growing by it adds nothing.
    assert_eq!(handle.grow_by(1).unwrap().blocks_added, 0);
    // Exactly the floor is allowed.
    assert_eq!(handle.set_budget(floor).unwrap().to_level, 0);
    // Absurd budgets load everything and say so.
    let r = handle.set_budget(u64::MAX).unwrap();
    assert_eq!(r.to_level, handle.max_level());
    assert_eq!(handle.budget(), handle.max_bytes());
    let r = handle.grow_by(u64::MAX).unwrap();
    assert_eq!((r.blocks_added, r.bytes_taken()), (0, 0));
    // shrink_by(x) then grow_by(x) comes back to the same level.
    let top = handle.level();
    let ask = (handle.max_bytes() - floor) / 3;
    let freed = handle.shrink_by(ask).unwrap();
    assert!(freed.bytes_freed() >= ask);
    let back = handle.grow_by(freed.bytes_freed()).unwrap();
    assert_eq!(
        (back.to_level, back.bytes_taken()),
        (top, freed.bytes_freed())
    );
}

#[test]
fn a_corrupted_block_is_refused_on_grow_and_the_model_stays() {
    let root = tempfile::tempdir().unwrap();
    let dir = compressed(root.path());
    let handle = BitStackHandle::open(&dir, None, &Device::Cpu).unwrap();
    handle.set_level(10).unwrap();
    let before = logits_of(&handle.snapshot());
    let (epoch, budget) = (handle.snapshot().epoch, handle.budget());

    // Flip bytes of the block at position 20 of the order, in place and
    // with the file's modification time kept, as bit rot would: only the
    // checksum can tell.
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let geometry = Geometry::from_config(&cfg).unwrap();
    let (name, block) = BlockOrder::load(&dir, &geometry).unwrap().order[20].clone();
    let tensor = format!("{name}.vt_{block}");
    flip_bytes_of(&dir, &tensor);

    let e = handle.set_level(30).unwrap_err();
    let msg = format!("{e}");
    assert!(matches!(
        e,
        ResizeError::Grow {
            level: 30,
            current: 10,
            ..
        }
    ));
    assert!(
        msg.contains("checksum") && msg.contains(&name) && msg.contains("level 10"),
        "{msg}"
    );
    assert_eq!(handle.level(), 10);
    assert_eq!((handle.snapshot().epoch, handle.budget()), (epoch, budget));
    assert_eq!(logits_of(&handle.snapshot()), before);
    // The blocks before the bad one still load.
    assert_eq!(handle.set_level(20).unwrap().to_level, 20);
    assert!(handle.grow_by(u64::MAX).is_err());
    assert_eq!(handle.level(), 20);
}

/// Flips the first 4 data bytes of `tensor` in whichever shard of `dir`
/// holds it, in place, keeping the file's modification time.
fn flip_bytes_of(dir: &Path, tensor: &str) {
    use std::io::{Read, Seek, SeekFrom, Write};
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let modified = file.metadata().unwrap().modified().unwrap();
        let mut len = [0u8; 8];
        file.read_exact(&mut len).unwrap();
        let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
        file.read_exact(&mut header).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&header).unwrap();
        let Some(start) = json[tensor]["data_offsets"][0].as_u64() else {
            continue;
        };
        let at = 8 + header.len() as u64 + start;
        let mut bytes = [0u8; 4];
        file.seek(SeekFrom::Start(at)).unwrap();
        file.read_exact(&mut bytes).unwrap();
        // Keep the f16 values finite: flip low mantissa bits only.
        bytes[0] ^= 0x5a;
        bytes[2] ^= 0x3c;
        file.seek(SeekFrom::Start(at)).unwrap();
        file.write_all(&bytes).unwrap();
        file.set_modified(modified).unwrap();
        file.sync_all().unwrap();
        return;
    }
    panic!("no shard holds {tensor}");
}

/// The shard of `dir` that holds block 0 of the first linear grown at level
/// `level` of the order.
fn shard_of_level(dir: &Path, level: usize) -> PathBuf {
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let geometry = Geometry::from_config(&cfg).unwrap();
    let (name, block) = BlockOrder::load(dir, &geometry).unwrap().order[level].clone();
    let store = bitstack_quant::format::store::TensorStore::open_dir(dir).unwrap();
    store
        .file_of(&format!("{name}.qweight_{block}"))
        .unwrap()
        .to_path_buf()
}

#[test]
fn a_shard_changed_under_a_running_model_is_an_error_on_grow_not_a_crash() {
    type Change = fn(&Path);
    let changes: [(&str, Change, &str); 3] = [
        // `cp new old` truncates in place first: with a memory map, the next
        // grow touching the cut pages died of SIGBUS.
        (
            "truncated in place",
            |p| {
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(f.metadata().unwrap().len() / 2).unwrap();
            },
            "bytes, now",
        ),
        // Same length, new bytes, new modification time.
        (
            "rewritten in place",
            |p| {
                let mut bytes = std::fs::read(p).unwrap();
                let n = bytes.len();
                bytes[n - 64..].iter_mut().for_each(|b| *b ^= 0x11);
                std::thread::sleep(Duration::from_millis(20));
                std::fs::write(p, bytes).unwrap();
                let f = std::fs::File::options().write(true).open(p).unwrap();
                f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
                    .unwrap();
            },
            "modification time",
        ),
        // Another file renamed over it: the open one is intact, but the
        // user has put another model there.
        (
            "replaced by a rename",
            |p| {
                let other = p.with_extension("new");
                std::fs::copy(p, &other).unwrap();
                std::fs::rename(&other, p).unwrap();
            },
            "another file is now at its path",
        ),
    ];
    for (what, change, expected) in changes {
        let root = tempfile::tempdir().unwrap();
        let dir = compressed(root.path());
        let handle = BitStackHandle::open(&dir, None, &Device::Cpu).unwrap();
        handle.set_level(0).unwrap();
        let before = logits_of(&handle.snapshot());
        let shard = shard_of_level(&dir, 0);
        change(&shard);
        let e = handle.set_level(handle.max_level()).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("changed on disk since it was opened")
                && msg.contains(expected)
                && msg.contains(&shard.display().to_string()),
            "{what}: {msg}"
        );
        assert_eq!(handle.level(), 0, "{what}");
        assert_eq!(logits_of(&handle.snapshot()), before, "{what}");
    }
}

#[test]
fn a_subscriber_that_calls_back_into_the_handle_does_not_deadlock() {
    let root = tempfile::tempdir().unwrap();
    let dir = compressed(root.path());
    let handle = BitStackHandle::open(&dir, None, &Device::Cpu).unwrap();
    let heard = Arc::new(AtomicUsize::new(0));
    let reentered = Arc::new(AtomicBool::new(false));
    {
        let (h, heard, reentered) = (handle.clone(), heard.clone(), reentered.clone());
        handle.subscribe(move |r| {
            heard.fetch_add(1, Ordering::SeqCst);
            // Everything the handle offers, from inside the callback.
            assert_eq!(h.level(), r.to_level);
            assert!(h.resident_bytes() <= h.budget());
            let _ = h.snapshot();
            if !reentered.swap(true, Ordering::SeqCst) {
                // A KV-cache manager that reacts to a resize with a resize.
                h.shrink_by(1).unwrap();
                let id = h.subscribe(|_| {});
                assert!(h.unsubscribe(id));
            }
        });
    }
    let (tx, rx) = mpsc::channel();
    let h = handle.clone();
    std::thread::spawn(move || {
        let r = h.set_level(5).map(|r| r.to_level);
        tx.send(r).unwrap();
    });
    let level = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a resize from inside a subscriber deadlocked")
        .unwrap();
    assert_eq!(level, 5);
    // The nested shrink ran and was heard too.
    assert_eq!(handle.level(), 4);
    assert_eq!(heard.load(Ordering::SeqCst), 2);
}

#[test]
fn concurrent_forwards_always_see_exactly_one_level() {
    let root = tempfile::tempdir().unwrap();
    let dir = compressed(root.path());
    let handle = BitStackHandle::open(&dir, None, &Device::Cpu).unwrap();
    // The logits of every level, computed one level at a time.
    let expected: Arc<Vec<Vec<f32>>> = Arc::new(
        (0..=handle.max_level())
            .map(|level| {
                handle.set_level(level).unwrap();
                logits_of(&handle.snapshot())
            })
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let total_forwards = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    for worker in 0..3 {
        let (h, expected, stop, tx) = (handle.clone(), expected.clone(), stop.clone(), tx.clone());
        let total_forwards = total_forwards.clone();
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            let mut forwards = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let snap = h.snapshot();
                let got = logits_of(&snap);
                if got != expected[snap.level] {
                    let matches: Vec<usize> = (0..expected.len())
                        .filter(|&l| expected[l] == got)
                        .collect();
                    panic!(
                        "worker {worker}: a forward on level {} gave the logits of levels {matches:?}",
                        snap.level
                    );
                }
                seen.insert(snap.level);
                forwards += 1;
                total_forwards.fetch_add(1, Ordering::Relaxed);
            }
            tx.send((forwards, seen.len())).unwrap();
        });
    }
    drop(tx);
    let resizer = {
        let (h, total_forwards) = (handle.clone(), total_forwards.clone());
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(17);
            let (floor, max) = (h.floor_bytes(), h.max_bytes());
            let mut moves = 0;
            // Thousands of resizes, and on until the forwards have run a while.
            let mut i = 0;
            while i < 3000 || total_forwards.load(Ordering::Relaxed) < 300 {
                i += 1;
                let r = match rng.random_range(0..3) {
                    0 => h.set_budget(rng.random_range(0..max + max / 10)),
                    1 => h.shrink_by(rng.random_range(0..(max - floor) / 4)),
                    _ => h.grow_by(rng.random_range(0..(max - floor) / 4)),
                };
                match r {
                    Ok(r) => moves += usize::from(r.from_level != r.to_level),
                    Err(ResizeError::BelowFloor { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
                assert!(h.resident_bytes() >= floor);
            }
            moves
        })
    };
    let moves = resizer.join().expect("the resizer panicked");
    stop.store(true, Ordering::Relaxed);
    let mut levels_seen = 0;
    for _ in 0..3 {
        let (forwards, seen) = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("a forward thread panicked or hung");
        assert!(forwards > 0);
        levels_seen = levels_seen.max(seen);
    }
    assert!(moves > 1000, "only {moves} resizes moved the level");
    assert!(levels_seen > 1, "the forwards never saw a resize");
}
