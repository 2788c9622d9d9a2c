//! Giving the heap's free memory back to the kernel once a burst is over.
//!
//! A burst of patches allocates and frees many short-lived buffers on several threads;
//! glibc's malloc keeps what was freed inside its arenas (only the top of the main heap
//! is trimmed by itself), so the daemon's resident memory kept the high-water mark of its
//! busiest burst (docs/BENCHMARKS.md, heap profile). `malloc_trim` returns the free pages
//! of every arena; the agent calls it when a burst has gone quiet, not per patch.

/// Returns free heap pages to the kernel (glibc only; elsewhere nothing to do).
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only takes malloc's own locks and works on its own data; it
    // is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
