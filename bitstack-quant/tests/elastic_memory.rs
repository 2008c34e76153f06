//! Memory is real: what a resize reports is what the allocator hands out or
//! takes back, and a shrink's blocks are freed when the last forward that
//! holds them ends. One test in its own binary, so that nothing else
//! allocates while it counts.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use bitstack_quant::format::synthetic::SyntheticSpec;
use bitstack_quant::method::compress::compress;
use bitstack_quant::runtime::elastic::BitStackHandle;
use candle_core::Device;

/// The system allocator, counting the bytes currently allocated.
struct Counting;

static ALLOCATED: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            ALLOCATED.fetch_add(layout.size() as isize, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        ALLOCATED.fetch_sub(layout.size() as isize, Ordering::SeqCst);
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            ALLOCATED.fetch_add(layout.size() as isize, Ordering::SeqCst);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            ALLOCATED.fetch_add(new_size as isize - layout.size() as isize, Ordering::SeqCst);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocated() -> i64 {
    ALLOCATED.load(Ordering::SeqCst) as i64
}

#[test]
fn resizes_allocate_and_free_exactly_the_bytes_they_report() {
    let root = tempfile::tempdir().unwrap();
    let dense = root.path().join("dense");
    SyntheticSpec {
        hidden: 128,
        intermediate: 344,
        layers: 3,
        ..Default::default()
    }
    .write(&dense)
    .unwrap();
    let calib = root.path().join("calib.txt");
    std::fs::write(&calib, "counting every byte of every block. ".repeat(40)).unwrap();
    let dir = root.path().join("packed");
    compress(&dense, &dir, &common::small_options(calib, 4, 5)).unwrap();

    let handle = BitStackHandle::open(&dir, None, &Device::Cpu).unwrap();
    handle.set_level(0).unwrap();
    handle.wait_released();
    let linears = handle.geometry().linears.len() as i64;
    let layers = 3;
    // Besides the blocks, a resize allocates the new snapshot: one stack
    // (and its list of block pointers) per changed linear, the cloned
    // layer list and config, and one pointer and counter per block.
    let metadata_bound = |blocks: i64| 4096 + 1024 * layers + 160 * linears + 32 * blocks;

    let check = |level: usize, holding_old_snapshot: bool| {
        let before = allocated();
        let held = holding_old_snapshot.then(|| handle.snapshot());
        let r = handle.set_level(level).unwrap();
        // Dropped blocks are freed off the resizing thread.
        handle.wait_released();
        let after_resize = allocated();
        let moved = (r.blocks_added + r.blocks_dropped) as i64;
        let bound = metadata_bound(moved);
        if r.bytes_taken() > 0 {
            let grew = after_resize - before;
            let blocks = r.bytes_taken() as i64;
            assert!(
                grew >= blocks && grew <= blocks + bound,
                "grow to {level}: allocator +{grew} B, resize reported +{blocks} B (metadata bound {bound} B)"
            );
        } else {
            let freed = r.bytes_freed() as i64;
            let shrank = before - after_resize;
            if held.is_some() {
                // A forward still holds the old snapshot: nothing is freed yet.
                assert!(
                    shrank <= 0 && -shrank <= bound,
                    "shrink to {level} under a forward: allocator {shrank:+} B"
                );
                drop(held);
                let shrank = before - allocated();
                assert!(
                    shrank >= freed - bound && shrank <= freed + bound,
                    "shrink to {level}, forward ended: allocator −{shrank} B, resize reported −{freed} B"
                );
            } else {
                assert!(
                    shrank >= freed - bound && shrank <= freed + bound,
                    "shrink to {level}: allocator −{shrank} B, resize reported −{freed} B (bound {bound} B)"
                );
            }
        }
        r
    };

    let baseline = allocated();
    let top = handle.max_level();
    let r = check(top, false);
    assert_eq!(r.blocks_added, top);
    check(top / 2, true);
    check(top / 3, false);
    check(top, true);
    check(0, false);
    // Back at the floor, what remains allocated is what was there before.
    let drift = allocated() - baseline;
    assert!(
        drift.abs() <= metadata_bound(0),
        "{drift} B still allocated after returning to the floor"
    );
    // And the reported resident bytes moved by exactly the block bytes.
    assert_eq!(handle.resident_bytes(), handle.floor_bytes());
}
