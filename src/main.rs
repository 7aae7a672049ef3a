//! The `ottomato` binary: the library's command line with the built-in kinds.

/// mimalloc instead of glibc malloc: a node allocates a little for every
/// task and state change from many threads; glibc's malloc/free were a
/// quarter of a node's CPU under task load (see BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    ottomato::cli::main()
}
