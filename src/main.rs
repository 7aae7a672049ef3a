//! The `ottomato` binary: the library's command line with the built-in kinds.

/// mimalloc instead of glibc malloc: a node allocates a little for every
/// task and state change from many threads; glibc's malloc/free were a
/// quarter of a node's CPU under task load (see BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    no_transparent_huge_pages();
    ottomato::cli::main()
}

/// Transparent huge pages off for this process, unless `MIMALLOC_ALLOW_THP`
/// is set (then mimalloc does as it says). mimalloc advises huge pages for
/// its arenas; a node growing by ~20 KB per claimed workload then spent a
/// third of its CPU zeroing fresh 2 MiB pages during a claim wave. Off:
/// 100 000 claims 13.5 → 12.1–12.4 s, node CPU 16.2 → 13–14 s
/// (BENCHMARKS.md).
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and reads
        // or writes no memory of ours; a kernel without it returns an error,
        // which changes nothing.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
}
