//! The process's global allocator: the system's (glibc malloc), except for
//! small over-aligned blocks, which come from per-size slabs.
//!
//! Owns: nothing but memory. Why it exists: tokio pads every task and every
//! socket registration to 128 bytes (cache lines), and glibc serves such
//! requests with `memalign`, which carves the aligned block out of a larger
//! one and leaves the pieces around it behind as free fragments. With two
//! such blocks per connection that was about 250 bytes per idle connection
//! (measured with 10,000 connections, see docs/BENCHMARKS.md). Here a block
//! with an alignment of 32 to 128 bytes and a size up to [`MAX_SIZE`] takes a
//! slot of its size class (multiples of 128 bytes, so every slot is 128-byte
//! aligned) from a slab of that class; a freed slot goes back on its class's
//! free list for the next block of that class. Slabs are taken from the
//! system allocator [`SLAB`] bytes at a time and kept for the process's
//! lifetime (as glibc keeps most freed memory too); their pages count in RSS
//! only once used. Everything else goes to the system allocator unchanged.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::Mutex;

/// Slot sizes are multiples of this, which is also the largest alignment served.
const GRAIN: usize = 128;
/// Largest block served from the slabs.
pub const MAX_SIZE: usize = 1024;
const CLASSES: usize = MAX_SIZE / GRAIN;
/// Bytes taken from the system per slab (page aligned).
const SLAB: usize = 256 * 1024;
const SLAB_ALIGN: usize = 4096;

/// One size class: a free list threaded through the freed slots, then the
/// untouched rest of the current slab.
struct Class {
    /// Address of the first free slot (0 = none); each free slot starts with
    /// the address of the next.
    free: usize,
    /// The next never-used slot of the current slab, and the slab's end.
    bump: usize,
    end: usize,
}

// `Mutex` here is the futex-based one: it never allocates.
static SLABS: [Mutex<Class>; CLASSES] = [const { Mutex::new(Class { free: 0, bump: 0, end: 0 }) }; CLASSES];

/// The global allocator of the `raftmq` binary (see the module docs).
pub struct Allocator;

/// The size class of a block served from the slabs, if it is one.
fn class_of(layout: Layout) -> Option<usize> {
    let (size, align) = (layout.size(), layout.align());
    if align <= 16 || align > GRAIN || size == 0 || size > MAX_SIZE {
        return None;
    }
    Some(size.div_ceil(GRAIN) - 1)
}

fn slot_size(class: usize) -> usize {
    (class + 1) * GRAIN
}

unsafe fn slab_alloc(class: usize) -> *mut u8 {
    let mut c = SLABS[class].lock().unwrap_or_else(|e| e.into_inner());
    if c.free != 0 {
        let slot = c.free as *mut usize;
        // SAFETY: `free` holds a slot of this class that was handed out and
        // freed; its first word is the next free slot's address.
        c.free = unsafe { slot.read() };
        return slot.cast();
    }
    let size = slot_size(class);
    if c.end - c.bump < size {
        // SAFETY: a non-zero size and a valid power-of-two alignment.
        let slab = unsafe { System.alloc(Layout::from_size_align_unchecked(SLAB, SLAB_ALIGN)) };
        if slab.is_null() {
            return ptr::null_mut();
        }
        // The rest of the previous slab (less than one slot) is left unused.
        c.bump = slab as usize;
        c.end = c.bump + SLAB;
    }
    let slot = c.bump;
    c.bump += size;
    slot as *mut u8
}

unsafe fn slab_free(class: usize, p: *mut u8) {
    let mut c = SLABS[class].lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: `p` is a slot of this class (at least 128 bytes, aligned), no
    // longer in use: its first word now links the free list.
    unsafe { p.cast::<usize>().write(c.free) };
    c.free = p as usize;
}

unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            // SAFETY: the caller's contract (non-zero size) is checked by class_of.
            Some(class) => unsafe { slab_alloc(class) },
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            Some(class) => {
                // SAFETY: as in alloc; the slot holds at least layout.size() bytes.
                let p = unsafe { slab_alloc(class) };
                if !p.is_null() {
                    unsafe { ptr::write_bytes(p, 0, layout.size()) };
                }
                p
            }
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        match class_of(layout) {
            // SAFETY: the same layout was served from this class by alloc.
            Some(class) => unsafe { slab_free(class, p) },
            None => unsafe { System.dealloc(p, layout) },
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees a valid layout for new_size with the same alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if class_of(layout).is_none() && class_of(new_layout).is_none() {
            return unsafe { System.realloc(p, layout, new_size) };
        }
        // A slab block on either side: move it.
        let q = unsafe { self.alloc(new_layout) };
        if !q.is_null() {
            unsafe {
                ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                self.dealloc(p, layout);
            }
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_small_over_aligned_blocks_only() {
        let l = |size, align| Layout::from_size_align(size, align).expect("layout");
        assert_eq!(class_of(l(512, 128)), Some(3));
        assert_eq!(class_of(l(256, 128)), Some(1));
        assert_eq!(class_of(l(129, 64)), Some(1));
        assert_eq!(class_of(l(1024, 32)), Some(7));
        assert_eq!(class_of(l(1025, 128)), None);
        assert_eq!(class_of(l(512, 16)), None);
        assert_eq!(class_of(l(512, 8)), None);
        assert_eq!(class_of(l(512, 256)), None);
        assert_eq!(class_of(l(0, 128)), None);
    }

    #[test]
    fn slots_are_aligned_distinct_and_reused() {
        let a = Allocator;
        let layout = Layout::from_size_align(500, 128).expect("layout");
        unsafe {
            // More than one slab's worth, so a refill happens too.
            let n = SLAB / 512 + 10;
            let blocks: Vec<*mut u8> = (0..n).map(|_| a.alloc(layout)).collect();
            for (i, &p) in blocks.iter().enumerate() {
                assert!(!p.is_null());
                assert_eq!(p as usize % 128, 0);
                ptr::write_bytes(p, i as u8, layout.size());
            }
            // No overlap: every block still holds its own pattern.
            for (i, &p) in blocks.iter().enumerate() {
                let s = std::slice::from_raw_parts(p, layout.size());
                assert!(s.iter().all(|&b| b == i as u8), "block {i} overwritten");
            }
            let freed = blocks[3];
            a.dealloc(freed, layout);
            // Other threads share the class; a freed slot may go to them, but a
            // slot handed out is never one still in use.
            let again = a.alloc(layout);
            assert!(!blocks.iter().enumerate().any(|(i, &p)| i != 3 && p == again));
            a.dealloc(again, layout);
            for (i, &p) in blocks.iter().enumerate() {
                if i != 3 {
                    a.dealloc(p, layout);
                }
            }
        }
    }

    #[test]
    fn zeroed_and_realloc_keep_contents() {
        let a = Allocator;
        let small = Layout::from_size_align(200, 128).expect("layout");
        unsafe {
            let p = a.alloc(small);
            ptr::write_bytes(p, 0xAB, 200);
            a.dealloc(p, small);
            let z = a.alloc_zeroed(small);
            assert!(std::slice::from_raw_parts(z, 200).iter().all(|&b| b == 0));
            ptr::write_bytes(z, 7, 200);
            // Grow within the slabs, then out of them, then back.
            let g = a.realloc(z, small, 900);
            assert_eq!(g as usize % 128, 0);
            assert!(std::slice::from_raw_parts(g, 200).iter().all(|&b| b == 7));
            let big = a.realloc(g, Layout::from_size_align(900, 128).expect("layout"), 5000);
            assert!(std::slice::from_raw_parts(big, 200).iter().all(|&b| b == 7));
            let back = a.realloc(big, Layout::from_size_align(5000, 128).expect("layout"), 300);
            assert!(std::slice::from_raw_parts(back, 200).iter().all(|&b| b == 7));
            a.dealloc(back, Layout::from_size_align(300, 128).expect("layout"));
        }
    }

    #[test]
    fn threads_never_share_a_slot() {
        let layout = Layout::from_size_align(256, 128).expect("layout");
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                std::thread::spawn(move || {
                    let a = Allocator;
                    for round in 0..200u32 {
                        let blocks: Vec<usize> =
                            (0..50).map(|_| unsafe { a.alloc(layout) } as usize).collect();
                        for &p in &blocks {
                            unsafe { ptr::write_bytes(p as *mut u8, t, 256) };
                        }
                        std::thread::yield_now();
                        for &p in &blocks {
                            let s = unsafe { std::slice::from_raw_parts(p as *const u8, 256) };
                            assert!(s.iter().all(|&b| b == t), "round {round}: slot shared between threads");
                            unsafe { a.dealloc(p as *mut u8, layout) };
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
    }
}
