//! Heap accounting for tests: a global allocator that counts each thread's heap bytes. A test
//! binary that uses it declares
//! `#[global_allocator] static ALLOC: common::heap::Counting = common::heap::Counting;`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Counts this thread's heap bytes (allocated minus freed): tests running in parallel do not
/// see each other's allocations.
pub struct Counting;

thread_local! {
    static HEAP: Cell<i64> = const { Cell::new(0) };
}

fn heap_add(n: i64) {
    let _ = HEAP.try_with(|h| h.set(h.get() + n));
}

/// This thread's heap bytes now (allocated minus freed since it started).
pub fn heap_now() -> i64 {
    HEAP.with(Cell::get)
}

// SAFETY: delegates every call to the system allocator; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            heap_add(l.size() as i64);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            heap_add(l.size() as i64);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        heap_add(-(l.size() as i64));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            heap_add(new as i64 - l.size() as i64);
        }
        q
    }
}
