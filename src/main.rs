use clap::Parser;

// Candle allocates a fresh buffer for every op's output. glibc serves large ones with
// mmap/munmap, and the kernel zeroes every page again on each touch; mimalloc reuses freed
// pages (training steps ran 1.4x faster here). When it returns them: `fewstep::alloc`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // Kept by default; `serve` sets its own delay from its config.
    fewstep::alloc::set_freed_pages(fewstep::alloc::FreedPages::Keep);
    let cli = fewstep::cli::Cli::parse();
    fewstep::cli::run(cli)
}
